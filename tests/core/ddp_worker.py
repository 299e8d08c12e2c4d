"""Run by tests through torchrun: trains on gloo and saves this rank's final weights."""

import sys
from pathlib import Path

import torch

import haet
from haet.core.distributed import shutdown
from haet.data import TensorData

out = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 1, 8, 8, generator=g)
y = (x.mean(dim=(1, 2, 3)) > 0).long()
haet.seed_everything(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
trainer = haet.Trainer(model, TensorData(x, y), TensorData(x, y), progress=False, batch_size=32, out_dir=out / "run",
                       device="cpu")
record = trainer.fit(epochs=2)
rank = trainer.rank
torch.save({"state": model.state_dict(), "steps": record.steps, "world": trainer.world_size,
            "cost_world": record.cost.get("world_size")}, out / f"rank{rank}.pt")
shutdown()
