"""mnist1d-seq: an offline sequence-transduction task, signal in, digit tokens out.

Why this task: the fully quantized Transformer of Bie et al. (HAET 2021) does speech
recognition, a continuous 1-D signal transcribed into a sequence of symbols of unknown length and
scored by an edit-distance error rate. Speech corpora cannot ship with haet, so this task keeps the
shape of that problem with data generated offline: each example concatenates 1 to 4 mnist1d
signals (40 samples each, generated from mnist1d's bundled templates, never downloaded) into one
signal of 160 samples (zero-padded), and the target is the sequence of their digit labels. A model
must find where each digit is, recognize it and stop after the last one; the metric is the token
error rate (Levenshtein distance of the greedy transcript to the reference / reference length),
as character error rate is in ASR.

Tokens: digits 0-9, BOS = 10, EOS = 11, PAD = 12 (13 classes). An example is
``x = (src, tgt_in)`` with ``src`` (160,) float and ``tgt_in`` (5,) = BOS, d1..dK, PAD...;
``y`` (5,) = d1..dK, EOS, PAD... (PAD is ignored by the loss). Train sequences are built from
mnist1d's 4,000 training signals, test sequences from its 1,000 test signals, so no signal of the
test set is seen in training; the composition of sequences is seeded.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .loader import Loader, TensorData
from .mnist1d import mnist1d_arrays

BOS, EOS, PAD = 10, 11, 12
VOCAB = 13
MAX_DIGITS = 4          # digits per sequence: 1..4, uniformly
SEGMENT = 40            # samples per mnist1d signal
SRC_LEN = MAX_DIGITS * SEGMENT
TGT_LEN = MAX_DIGITS + 1
N_TRAIN, N_TEST = 8000, 2000  # sequences; enough test tokens (~7,000) for a 0.1-point resolution


class TensorTuple:
    """Several tensors with a common first dimension, indexed together (a batch's ``x`` tuple)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ValueError("all tensors of a TensorTuple need the same length")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index) -> tuple:
        return tuple(t[index] for t in self.tensors)

    def to(self, device) -> "TensorTuple":
        return TensorTuple(*(t.to(device) for t in self.tensors))


def make_sequences(signals: np.ndarray, labels: np.ndarray, n: int, seed: int) -> TensorData:
    """`n` sequences of 1..MAX_DIGITS signals drawn from (`signals`, `labels`), seeded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_DIGITS + 1, size=n)
    picks = rng.integers(0, len(signals), size=(n, MAX_DIGITS))
    src = np.zeros((n, SRC_LEN), dtype=np.float32)
    tgt_in = np.full((n, TGT_LEN), PAD, dtype=np.int64)
    y = np.full((n, TGT_LEN), PAD, dtype=np.int64)
    tgt_in[:, 0] = BOS
    for i, (k, pick) in enumerate(zip(lengths, picks)):
        src[i, :k * SEGMENT] = signals[pick[:k]].reshape(-1)
        digits = labels[pick[:k]]
        y[i, :k], y[i, k] = digits, EOS
        tgt_in[i, 1:k + 1] = digits
    return TensorData(TensorTuple(torch.from_numpy(src), torch.from_numpy(tgt_in)), torch.from_numpy(y))


def load_mnist1d_seq(seed: int, data_dir: str | None = None) -> tuple[TensorData, TensorData]:
    x, y, xt, yt = mnist1d_arrays()
    return (make_sequences(x, y, N_TRAIN, seed), make_sequences(xt, yt, N_TEST, seed + 1_000_003))


def seq_loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy, PAD ignored; ``reduction="none"`` gives one mean per sequence."""
    per_token = F.cross_entropy(outputs.transpose(1, 2), targets, ignore_index=PAD, reduction="none")
    if reduction == "none":
        mask = (targets != PAD).float()
        return (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_token.sum() / (targets != PAD).sum().clamp_min(1)


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, src: torch.Tensor) -> torch.Tensor:
    """Greedy transcripts (B, TGT_LEN) using only ``model((src, tgt_in))`` (causal decoder)."""
    tgt = torch.full((len(src), TGT_LEN), PAD, dtype=torch.long, device=src.device)
    tgt[:, 0] = BOS
    out = torch.empty_like(tgt)
    for t in range(TGT_LEN):
        logits = model((src, tgt))
        out[:, t] = logits[:, t].argmax(-1)
        if t + 1 < TGT_LEN:
            tgt[:, t + 1] = out[:, t]
    return out


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def transcript(tokens: list[int]) -> list[int]:
    """The digits before the first EOS (BOS and PAD dropped)."""
    out = []
    for t in tokens:
        if t == EOS:
            break
        if t < 10:
            out.append(t)
    return out


def seq_eval(model: torch.nn.Module, data: TensorData, device, batch_size: int = 500) -> dict:
    """Token error rate of greedy transcripts, ``accuracy = 1 - token_error_rate`` (floored at 0),
    and the teacher-forced loss."""
    was_training = model.training
    model.eval()
    edits = ref_len = 0
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for (src, tgt_in), y in Loader(data, batch_size, shuffle=False):
            src, tgt_in, y = src.to(device), tgt_in.to(device), y.to(device)
            loss_sum += float(seq_loss(model((src, tgt_in)), y)) * len(y)
            n += len(y)
            for hyp, ref in zip(greedy_decode(model, src).tolist(), y.tolist()):
                ref = transcript(ref)
                edits += edit_distance(transcript(hyp), ref)
                ref_len += len(ref)
    model.train(was_training)
    ter = edits / max(ref_len, 1)
    return {"accuracy": max(0.0, 1.0 - ter), "token_error_rate": ter, "loss": loss_sum / max(n, 1)}
