"""The modules and patched transformers models train under DDP and FSDP2 (``fully_shard``) with
activation checkpointing: one step's gradients on two gloo ranks, each with half the batch,
equal a single process's on the whole batch (spawned CPU processes, Triton's interpreter).
"""

import copy
import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from posenc_triton import ALiBiAttention, RoPEAttention

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 2


class Checkpointed(torch.nn.Module):
    """A causal attention module whose activations are recomputed in the backward."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return checkpoint(self.attention, x, use_reentrant=False, is_causal=True)


def _module(kind):
    torch.manual_seed(0)
    if kind == "alibi":
        return Checkpointed(ALiBiAttention(48, 6, num_kv_heads=2, trainable_slopes=True))
    return Checkpointed(RoPEAttention(48, 6, max_seq_len=32, num_kv_heads=3))


def _hf_model(name):
    from test_integrations_models import make_model

    from posenc_triton.integrations import transformers as hf

    model = make_model(name)
    hf.apply(model)
    assert hf.patched_layers(model), f"{name}: no layer patched"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _batch(kind, batch):
    gen = torch.Generator().manual_seed(3)
    if kind in ("alibi", "rope"):
        return {"x": torch.randn(batch, 12, 48, generator=gen)}
    ids = torch.randint(3, 128, (batch, 12), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _loss(model, kind, inputs):
    if kind in ("alibi", "rope"):
        return model(inputs["x"]).square().mean()
    return model(**inputs).loss


def _wrap(model, how, kind):
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    if kind not in ("alibi", "rope"):  # one FSDP unit per decoder layer, then the root
        for layer in model.base_model.layers if hasattr(model.base_model, "layers") else (
                model.base_model.h):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def step_matches_single_process(rank, kind, how):
    model = _module(kind) if kind in ("alibi", "rope") else _hf_model(kind)
    single = copy.deepcopy(model)
    inputs = _batch(kind, 2 * WORLD)
    _loss(single, kind, inputs).backward()
    wrapped = _wrap(model, how, kind)
    _loss(wrapped, kind, {k: v.chunk(WORLD)[rank] for k, v in inputs.items()}).backward()
    want = dict(single.named_parameters())
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        torch.testing.assert_close(grad, want[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{kind} {how} {name}: {m}")


CASES = [(kind, how) for kind in ("alibi", "rope", "llama", "bloom") for how in ("ddp", "fsdp2")]


def _worker(rank, port, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    failures = {}
    for kind, how in CASES:
        try:
            step_matches_single_process(rank, kind, how)
        except Exception:  # reported by the test of the case
            failures[(kind, how)] = traceback.format_exc()
    torch.save(failures, os.path.join(folder, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def training_failures():
    """``{(kind, how): [traceback per failing rank]}`` from one spawn of both ranks."""
    pytest.importorskip("transformers")
    from test_distributed import _free_port

    found = {}
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(_free_port(), folder), nprocs=WORLD, join=True)
        for rank in range(WORLD):
            for case, error in torch.load(os.path.join(folder, f"{rank}.pt")).items():
                found.setdefault(case, []).append(f"rank {rank}:\n{error}")
    return found


@pytest.mark.parametrize("kind, how", CASES)
def test_one_step_equals_single_process(training_failures, kind, how):
    errors = training_failures.get((kind, how))
    assert not errors, "\n".join(errors)
