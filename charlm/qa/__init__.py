"""Question answering with an end-to-end memory network: babi (parser), batches (questions as
index arrays), encoders (sentence encoders), model (the network, QAModel), checkpoint, train."""
