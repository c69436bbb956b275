"""A plain FSDP2 loop (nothing gradguard-specific in it): gloo on CPU, ``fully_shard`` per
layer and on the model, torch's own ``clip_grad_norm_`` (which returns a DTensor here), and
a digest of the full weights printed by rank 0.

    torchrun --nproc-per-node 2 tests/scripts/fsdp_plain.py
    torchrun --nproc-per-node 2 -m gradguard run tests/scripts/fsdp_plain.py
"""

import hashlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(rank)
    for _ in range(20):
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.mse_loss(model(x), x[:, :4].sum(1, keepdim=True).sin())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    full = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    if rank == 0:
        print("weights", hashlib.sha1(full.numpy().tobytes()).hexdigest()[:12], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
