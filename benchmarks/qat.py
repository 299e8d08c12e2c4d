"""Fully quantized 8-bit training against float32: accuracy, export size, training time, energy.

    python benchmarks/qat.py [--seeds 3] [--cnn-epochs 5] [--seq-epochs 12] [--skip-cnn] [--skip-seq]

Two parts, each run interleaved seed by seed (float, then each QAT variant, same initialization
and data order), after an untimed warm-up run:
- mnist5k, the DESIGN default CNN: float32, qat 8-bit, qat 4-bit (weights and activations).
- mnist1d-seq, the encoder-decoder Transformer: float32 and qat 8-bit; token error rate of greedy
  transcripts (target: within 1 point of float), and of the integer export (`convert`).
For every QAT run the integer export is checked against the fake-quantized model on the test set
(argmax agreement, max |logit difference|). Train time is the Trainer's (evaluation excluded);
energy is haet's energy model (source "model": FLOPs by number format × energy per op + DRAM
bytes × energy per byte), not a measurement. Medians over seeds; ratios are QAT / float.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics

import torch

import haet
from haet.core.record import hardware_info
from haet.data import get_task
from haet.data.seq import seq_eval
from haet.methods import parse_entry
from haet.methods.qat import convert, export_bytes
from haet.models import build_model

SEQ_LR = 3e-3  # peak learning rate of the Transformer (Adam)


class WarmupLinearDecay(haet.Method):
    """Learning rate: linear warm-up over the first epoch, then linear decay to 0 (the usual
    Transformer schedule; without it Adam at 3e-3 has loss spikes late in training)."""

    name = "lr_schedule"

    def __init__(self, peak: float) -> None:
        super().__init__()
        self.peak = peak

    def batch_start(self, state) -> None:
        per_epoch = -(-len(state.train_data) // state.batch_size)
        total, step = state.epochs * per_epoch, state.step + 1
        factor = min(step / per_epoch, max(0.0, (total - step + 1) / (total - per_epoch + 1)))
        for group in state.optimizer.param_groups:
            group["lr"] = self.peak * factor


def train(task_name: str, model_name: str, spec: str, seed: int, epochs: int, data) -> dict:
    task = get_task(task_name)
    train_data, test_data = data
    haet.seed_everything(seed)
    model = build_model(model_name, task.input_shape, task.num_classes)
    methods, optimizer = parse_entry(spec), None
    if task_name == "mnist1d-seq":  # Adam 3e-3 with warm-up and decay; the CNN keeps DESIGN's Adam 1e-3
        methods.append(WarmupLinearDecay(SEQ_LR))
        optimizer = lambda params: torch.optim.Adam(params, lr=SEQ_LR)  # noqa: E731
    # The Transformer is evaluated once at the end (greedy decoding of 2,000 sequences each epoch
    # would cost more than the training); the CNN by the Trainer after each epoch.
    eval_data = None if task_name == "mnist1d-seq" else test_data
    record = haet.Trainer(model, train_data, eval_data, methods=methods, loss_fn=task.loss_fn, eval_fn=task.eval_fn,
                          optimizer=optimizer, seed=seed, progress=False).fit(epochs)
    metrics = record.metrics if eval_data is not None else seq_eval(model, test_data, torch.device("cpu"))
    row = {"accuracy": metrics["accuracy"], "train_s": record.cost["train_s"],
           "energy_j": record.cost["energy_model_j"], "compute_j": record.cost["energy_model_split_j"]["compute"],
           "memory_j": record.cost["energy_model_split_j"]["memory"],
           "bytes": export_bytes(model), "ter": metrics.get("token_error_rate")}
    if spec != "baseline":
        int_model = convert(model)
        row["bytes"] = export_bytes(int_model)
        row.update(agreement(model, int_model, test_data))
        if task_name == "mnist1d-seq":
            row["int_ter"] = seq_eval(int_model, test_data, torch.device("cpu"))["token_error_rate"]
    return row


@torch.no_grad()
def agreement(model, int_model, test_data) -> dict:
    model.eval()
    x = test_data.x[:]  # all test inputs (a tuple (src, tgt_in) for mnist1d-seq)
    fake, exact = model(x), int_model(x)
    return {"argmax_agree": float((fake.argmax(-1) == exact.argmax(-1)).float().mean()),
            "max_logit_diff": float((fake - exact).abs().max()),
            "logit_range": float(exact.abs().max())}


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def part(title: str, task: str, model: str, specs: list[str], seeds: int, epochs: int) -> None:
    data = get_task(task).load(0, None)
    print(f"\n## {title}: {task} / {model}, {epochs} epochs, seeds 0..{seeds - 1}")
    train(task, model, specs[-1], 0, 1, data)  # warm-up (untimed)
    rows: dict[str, list[dict]] = {s: [] for s in specs}
    for seed in range(seeds):
        for spec in specs:
            rows[spec].append(train(task, model, spec, seed, epochs, data))
            r = rows[spec][-1]
            print(f"  seed {seed} {spec:26s} acc {r['accuracy']:.4f}" + (f" TER {r['ter']:.4f}" if r["ter"] is not None else "")
                  + f"  train {r['train_s']:.2f} s", flush=True)
    base = rows[specs[0]]
    print(f"\n| variant | accuracy (per seed) | {'TER (median) | int export TER | ' if task == 'mnist1d-seq' else ''}"
          "train s | × float | export bytes | float / export | energy J (model) | × float | argmax agree | max |Δlogit| / max |logit| |")
    print("|---|---|" + ("---|---|" if task == "mnist1d-seq" else "") + "---|---|---|---|---|---|---|---|")
    for spec in specs:
        rs = rows[spec]
        accs = ", ".join(f"{r['accuracy']:.3f}" for r in rs)
        cells = [spec, accs]
        if task == "mnist1d-seq":
            cells += [f"{median(rs, 'ter'):.4f}", f"{median(rs, 'int_ter'):.4f}" if median(rs, "int_ter") is not None else "–"]
        cells += [f"{median(rs, 'train_s'):.2f}", f"{median(rs, 'train_s') / median(base, 'train_s'):.2f}",
                  f"{median(rs, 'bytes'):,.0f}", f"{median(base, 'bytes') / median(rs, 'bytes'):.2f}",
                  f"{median(rs, 'energy_j'):.4g}", f"{median(rs, 'energy_j') / median(base, 'energy_j'):.2f}"]
        if spec == "baseline":
            cells += ["–", "–"]
        else:
            cells += [f"{min(r['argmax_agree'] for r in rs):.4f}",
                      f"{max(r['max_logit_diff'] / r['logit_range'] for r in rs):.2e}"]
        print("| " + " | ".join(cells) + " |")
    if task == "mnist1d-seq":
        gap = [100 * (q["ter"] - f["ter"]) for q, f in zip(rows[specs[1]], base)]
        print(f"\nTER gap qat − float, points per seed: {', '.join(f'{g:+.2f}' for g in gap)}; "
              f"median {statistics.median(gap):+.2f} (target ≤ +1.00)")
    for spec in specs:
        rs = rows[spec]
        print(f"{spec}: modelled energy split, compute {median(rs, 'compute_j'):.4g} J, memory {median(rs, 'memory_j'):.4g} J")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cnn-epochs", type=int, default=5)
    ap.add_argument("--seq-epochs", type=int, default=12)
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--skip-seq", action="store_true")
    args = ap.parse_args()
    hw = hardware_info(torch.device("cpu"))
    print(f"# benchmarks/qat.py, {datetime.date.today().isoformat()}, {hw.get('cpu')}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}")
    if not args.skip_cnn:
        part("mnist5k CNN", "mnist5k", "mnist5k-cnn", ["baseline", "qat", "qat:bits_w=4,bits_a=4"],
             args.seeds, args.cnn_epochs)
    if not args.skip_seq:
        part("Transformer", "mnist1d-seq", "transformer", ["baseline", "qat"], args.seeds, args.seq_epochs)


if __name__ == "__main__":
    main()
