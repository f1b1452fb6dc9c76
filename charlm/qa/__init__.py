"""Question answering with an end-to-end memory network: babi (parser), model, checkpoint, train."""
