"""What a client does in one round, and the only things it sends back.

A client receives the slice of the global model that fits its width and the output slot of each
of its private new classes, trains locally with the haet Trainer (so its time, FLOPs and energy
are metered like any run), and, under the zero-shot strategy when it holds new classes,
synthesizes data impressions of every class it knows from its trained model. It returns a
`ClientUpdate`: weights, impressions with their class slot or private name, and statistics.
Raw samples never appear in it (tests assert this on every update the server receives).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.trainer import Trainer
from ..data.loader import TensorData
from ..meters.hardware import HardwareTable
from . import impressions, models
from .config import FedConfig
from .shards import ClientShard, train_labels

#: The fields a ClientUpdate may carry; anything else is a leak (checked by the server and tests).
UPDATE_FIELDS = ("client", "weights", "num_samples", "impressions", "impression_slots", "impression_names",
                 "impression_targets", "stats")


@dataclass
class ClientUpdate:
    client: int
    weights: dict[str, torch.Tensor]   # the client's trained slice of the global model
    num_samples: int                   # its weight in the average
    impressions: torch.Tensor          # (n, *input_shape) synthesized inputs, or (0, ...)
    impression_slots: torch.Tensor     # output slot each impression was synthesized for
    impression_names: torch.Tensor     # private new-class name j (>= 0) or -1 for a seen class
    impression_targets: torch.Tensor   # (n, classes) the client model's probabilities on each impression
    stats: dict[str, float | str] = field(default_factory=dict)  # train_s, energy_j, energy_source, ...

    def bytes_up(self) -> int:
        tensors = list(self.weights.values()) + [self.impressions, self.impression_slots, self.impression_names,
                                                 self.impression_targets]
        return sum(t.numel() * t.element_size() for t in tensors)


def client_round(shard: ClientShard, client: int, config: FedConfig, weights: dict[str, torch.Tensor],
                 slots: list[int], round_index: int, input_shape: tuple[int, ...], num_classes: int) -> ClientUpdate:
    """Train `weights` (this client's slice) on `shard` for one round; slots[j] = output of private new class j."""
    model = models.build(input_shape, num_classes, config.width_of(client))
    model.load_state_dict(weights)
    seed = config.seed * 1_000_003 + round_index * 1_009 + client
    labels = train_labels(shard, dict(enumerate(slots)))
    trainer = Trainer(model, TensorData(shard.x, labels), None, device=config.device, seed=seed, progress=False,
                      batch_size=config.batch_size, optimizer=lambda p: torch.optim.Adam(p, lr=config.lr),
                      task=config.task, model_name=f"{models.family_name(input_shape)}-w{config.width_of(client)}")
    record = trainer.fit(config.local_epochs)
    model = model.cpu()
    stats: dict[str, float | str] = {"train_s": float(record.cost.get("train_s", 0.0)),
                                     "energy_j": float(record.cost.get("energy_j") or 0.0),
                                     "energy_source": str(record.cost.get("energy_source")),
                                     "flops": float(record.cost.get("flops") or 0.0),
                                     "train_loss": float(record.history[-1]["train_loss"] or 0.0)}
    x = torch.zeros(0, *input_shape)
    slot_t = names_t = torch.zeros(0, dtype=torch.long)
    targets = torch.zeros(0, num_classes)
    if config.strategy == "zeroshot" and shard.num_new > 0:
        x, slot_t, names_t, targets, synth = _impressions_of(model, shard, labels, slots, config, seed, input_shape,
                                                     record.cost.get("flops"), record.steps * config.batch_size)
        stats.update(synth)
    return ClientUpdate(client, {k: v.detach().clone() for k, v in model.state_dict().items()}, len(shard.labels),
                        x, slot_t, names_t, targets, stats)


def _impressions_of(model, shard, labels, slots, config, seed, input_shape, train_flops, train_samples):
    """Impressions of every class the client holds (seen ones too: the server's training on them
    stays balanced rather than pulled towards the new classes)."""
    classes = sorted(set(labels.tolist()))
    start = time.perf_counter()
    lo, hi = float(shard.x.min()), float(shard.x.max())
    x, owner = impressions.synthesize(model, classes, config.impressions_per_class, input_shape,
                                      steps=config.impression_steps, seed=seed, value_range=(lo, hi))
    with torch.no_grad():
        targets = torch.softmax(model.eval()(x), dim=1)  # what the server distils (Nayak et al.: soft targets)
    synth_s = time.perf_counter() - start
    name_of_slot = {s: j for j, s in enumerate(slots)}
    names = torch.tensor([name_of_slot.get(int(s), -1) for s in owner], dtype=torch.long)
    # Synthesis FLOPs from the Trainer's own count: one training sample ≈ 3 forward passes, like one
    # synthesis step of one impression (forward + backward to the input).
    per_forward = (train_flops or 0.0) / max(train_samples, 1) / 3.0
    flops = impressions.synthesis_flops(per_forward, len(x), config.impression_steps)
    energy = flops * HardwareTable.default().pj_per_flop("float32") * 1e-12
    return x, owner, names, targets, {"impression_s": synth_s, "impression_flops": flops, "impression_energy_j": energy,
                             "impression_energy_source": "model"}
