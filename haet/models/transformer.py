"""A small encoder-decoder Transformer for sequence transduction (``transformer``, mnist1d-seq).

The shape of a Speech-Transformer (the model of Bie et al., "Fully quantizing Transformer-based
ASR for edge deployment", HAET 2021), scaled to a CPU: a convolutional
front-end subsamples the signal 4× (two strided Conv1d, as the Speech-Transformer's conv
subsampling does), then pre-norm encoder layers, and a decoder with causal self-attention,
cross-attention and a linear output layer over the token vocabulary.

Every product of two activations is a `MatMul` module (Q·Kᵀ and probabilities·V), so that a
quantizer can see and replace it (`haet.methods.qat` does); the attention scale 1/√d_head is a
power of two for the default d_head = 16, so it stays exact in fixed point.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MatMul(nn.Module):
    """``a @ b`` as a module: the product of two activations, visible to model surgery."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads, self.d_head = heads, d_model // heads
        # No biases in the projections (as in PaLM or LLaMA): fewer int32 values in an integer export.
        self.q, self.k, self.v = (nn.Linear(d_model, d_model, bias=False) for _ in range(3))
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.scores, self.mix = MatMul(), MatMul()   # Q·Kᵀ and softmax(·)·V
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split(self.q(x)) * (1.0 / math.sqrt(self.d_head))
        k, v = self._split(self.k(memory)), self._split(self.v(memory))
        scores = self.scores(q, k.transpose(-2, -1))
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        attn = self.drop(torch.softmax(scores, dim=-1))
        out = self.mix(attn, v).transpose(1, 2).flatten(2)
        return self.out(out)


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d_model), MultiHeadAttention(d_model, heads, dropout)
        self.norm2, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h))
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(d_model), MultiHeadAttention(d_model, heads, dropout)
        self.norm2, self.cross_attn = nn.LayerNorm(d_model), MultiHeadAttention(d_model, heads, dropout)
        self.norm3, self.ff = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, causal))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory))
        return x + self.drop(self.ff(self.norm3(x)))


def sinusoid(length: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class Seq2SeqTransformer(nn.Module):
    """``model((src, tgt_in)) -> logits (B, T, vocab)``; `src` is (B, L) or (B, 1, L) signal."""

    def __init__(self, src_len: int, vocab: int, d_model: int = 64, heads: int = 4, d_ff: int = 128,
                 enc_layers: int = 2, dec_layers: int = 2, max_tgt: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.frontend = nn.Sequential(                   # 4× subsampling of the signal
            nn.Conv1d(1, d_model // 2, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv1d(d_model // 2, d_model, 5, stride=2, padding=2), nn.ReLU())
        n_frames = (src_len + 3) // 4
        self.register_buffer("src_pos", sinusoid(n_frames, d_model), persistent=False)
        self.register_buffer("tgt_pos", sinusoid(max_tgt, d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, dropout) for _ in range(enc_layers))
        self.enc_norm = nn.LayerNorm(d_model)
        self.embed = nn.Embedding(vocab, d_model)
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads, d_ff, dropout) for _ in range(dec_layers))
        self.dec_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.embed_scale = math.sqrt(d_model)  # the usual √d_model; 8, a power of two, at d_model = 64
        self.drop = nn.Dropout(dropout)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        if src.dim() == 2:
            src = src.unsqueeze(1)
        h = self.frontend(src).transpose(1, 2)           # (B, frames, d_model)
        h = self.drop(h + self.src_pos[:h.shape[1]])
        for layer in self.encoder:
            h = layer(h)
        return self.enc_norm(h)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        t = tgt_in.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).triu(1)
        h = self.drop(self.embed(tgt_in) * self.embed_scale + self.tgt_pos[:t])
        for layer in self.decoder:
            h = layer(h, memory, causal)
        return self.head(self.dec_norm(h))

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        src, tgt_in = x
        return self.decode(tgt_in, self.encode(src))


def transformer(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The registry's builder: `input_shape` = (signal length,) or (1, length); classes = vocabulary."""
    return Seq2SeqTransformer(src_len=input_shape[-1], vocab=num_classes)
