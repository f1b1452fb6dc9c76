"""charlm: recurrent language models (RNN, GRU, LSTM) trained, sampled and scored from the command line."""
__version__ = "0.1.0"
