"""PyTorch reference loops shared by the benchmarks (PyTorch is the benchmark-only extra)."""
from __future__ import annotations


def lstmcell_sampler(torch, V: int, E: int, H: int, n: int, temperature: float = 0.8):
    """PyTorch's fastest batch-1 path for a 2-layer char LSTM (V, E, H), random weights: a function that
    samples n tokens with an LSTMCell loop (embedding, two cells, linear, softmax, multinomial)."""
    emb, dec = torch.nn.Embedding(V, E), torch.nn.Linear(H, V)
    cells = [torch.nn.LSTMCell(E, H), torch.nn.LSTMCell(H, H)]

    def loop():
        with torch.no_grad():
            hs = [(torch.zeros(1, H), torch.zeros(1, H)) for _ in cells]
            tok = torch.tensor([0])
            for _ in range(n):
                x = emb(tok)
                for k, c in enumerate(cells):
                    hs[k] = c(x, hs[k])
                    x = hs[k][0]
                tok = torch.multinomial(torch.softmax(dec(x) / temperature, -1), 1)[0]
    return loop
