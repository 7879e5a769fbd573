"""Parameter shapes of the models the torch benchmarks step (CPU and GPU)."""


def transformer_shapes(vocab=8000, d=128, blocks=16, hidden=512, scale=1):
    """A small transformer's parameters: embedding ``vocab x d``, ``blocks`` blocks of attention
    and MLP weights with their LayerNorms and biases, the final LayerNorm and the output layer
    (197 tensors, 5.2M elements at the defaults). ``scale`` divides the vocabulary and widths."""
    vocab, d, hidden = vocab // scale, max(8, d // scale), max(8, hidden // scale)
    shapes = [(vocab, d)]
    for _ in range(blocks):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,)]  # attention, LayerNorm
        shapes += [(hidden, d), (hidden,), (d, hidden), (d,), (d,), (d,)]  # MLP, LayerNorm
    return shapes + [(d,), (d,), (vocab, d), (vocab,)]  # final LayerNorm, output layer
