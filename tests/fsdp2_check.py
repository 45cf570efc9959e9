"""FSDP2 on CPU processes (gloo), for tests/test_distributed.py: ``torchrun --standalone
--nproc_per_node 2 tests/fsdp2_check.py``. Accelerate runs FSDP on GPUs only, so this shards a tiny
Llama with torch's ``fully_shard`` itself and checks what distributed.py and checkpoints.py do under
FSDP2: the adapter is gathered whole for saving (and saved), the shards come back, and the
optimizer state saved whole is cut back into the same shards."""

import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import DistributedType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adaptercli  # noqa: E402
from adaptercli.checkpoints import full_optimizer_state, shard_like  # noqa: E402
from adaptercli.distributed import full_weights  # noqa: E402
from adaptercli.formats import read_adapter  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (2,))
model = adaptercli.init(tiny_model("llama"))
model.add_adapter("a", "lora")
model.train_adapter("a")
torch.manual_seed(1)
with torch.no_grad():
    for p in model.adapter_state.adapter_parameters("a").values():
        p.add_(torch.randn_like(p))
whole = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
for layer in model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
sharded = [p for p in model.parameters() if p.requires_grad]
assert all(isinstance(p, DTensor) for p in sharded), "fsdp2 shards into DTensors"
assert any(p.to_local().numel() < p.numel() for p in sharded)
opt = torch.optim.AdamW(sharded, lr=1e-3)
ids = torch.randint(0, 100, (2, 5))
model(input_ids=ids)[0].pow(2).mean().backward()
opt.step()
acc = types.SimpleNamespace(unwrap_model=lambda m: m, distributed_type=DistributedType.FSDP, state=None,
                            is_main_process=rank == 0)
with full_weights(acc, model) as m:
    if rank == 0:
        got = {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
        assert all(not isinstance(p, DTensor) for p in got.values())
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in whole.items()}
        folder = Path(tempfile.mkdtemp()) / "a"
        m.save_adapter(folder, "a")
        saved = read_adapter(folder, with_head=False).weights
        assert saved and all(t.shape == whole[k].shape for k, t in saved.items()), "whole weights saved, not shards"
assert all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad), "the shards are back"
state = full_optimizer_state(opt)
assert all(not isinstance(v, DTensor) for s in state["state"].values() for v in s.values())
reference = {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
params = [p for g in opt.param_groups for p in g["params"]]
back = {i: {k: shard_like(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}
for i, s in back.items():
    for k, v in s.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        assert torch.equal(full, reference[i][k]), (i, k)
print(f"rank {rank}: fsdp2 gather and optimizer round trip ok", flush=True)
# Both ranks reach here before either tears its process group down: a rank that exits while
# its peer still runs local checks can abort in gloo's teardown ("terminate called without an
# active exception", exit -6) although every check passed.
dist.barrier()
dist.destroy_process_group()
