"""`actors.vllm_nccl` against the installed vLLM.

* `test_meta_*`: pure, always runs.
* `test_vllm_api_matches_what_vllm_nccl_calls` (`vllm` marker): without CUDA. Records every vLLM call
  the module makes and checks each one against the installed vLLM: its signature, dict keys and
  dataclasses.
* `test_nccl_sync_into_vllm_engine_needs_two_cuda_gpus` (`gpu` marker): a real NCCL transfer. The
  learner is on cuda:1 and a vLLM engine on cuda:0. Skipped without 2 GPUs.
"""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from actors import vllm_nccl


def test_meta_reports_dtype_names_and_full_shapes():
    zero3_param = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16))
    zero3_param.ds_shape = torch.Size([4, 8])  # what a ZeRO-3 partitioned parameter carries
    meta = vllm_nccl.TrainerSender.meta([("a.weight", torch.zeros(2, 3)), ("b.weight", zero3_param)])
    assert meta == [("a.weight", "float32", [2, 3]), ("b.weight", "bfloat16", [4, 8])]
    assert all(isinstance(getattr(torch, dtype), torch.dtype) for _, dtype, _ in meta)


class _RecordingLLM:
    """Stands in for `vllm.LLM`: records method calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


@pytest.mark.vllm
def test_vllm_api_matches_what_vllm_nccl_calls(monkeypatch, tmp_path):
    pytest.importorskip("vllm")
    from vllm import LLM
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer import nccl_common, packed_tensor
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    from vllm.engine.arg_utils import EngineArgs

    def check_llm_calls(llm: _RecordingLLM) -> None:
        for name, args, kwargs in llm.calls:
            inspect.signature(getattr(LLM, name)).bind(llm, *args, **kwargs)

    # engine_kwargs: LLM(**kwargs) forwards them to EngineArgs, which must build an NCCL WeightTransferConfig.
    kwargs = vllm_nccl.engine_kwargs({})
    assert "kwargs" in inspect.signature(LLM.__init__).parameters
    wt = EngineArgs(model=str(tmp_path), **kwargs).weight_transfer_config  # a local path: no hub lookup
    assert isinstance(wt, WeightTransferConfig) and wt.backend == "nccl"
    assert "nccl" in WeightTransferEngineFactory._registry

    # engine_init: one init_weight_transfer_engine call whose init_info the NCCL engine's dataclass accepts.
    llm = _RecordingLLM()
    vllm_nccl.engine_init(llm, "10.0.0.1", 29500, 3, 5, bucket_bytes=1 << 20)
    check_llm_calls(llm)
    [(name, (request,), _)] = llm.calls
    assert name == "init_weight_transfer_engine" and isinstance(request, WeightTransferInitRequest)
    info = NCCLWeightTransferEngine.init_info_cls(**request.init_info)
    assert (info.master_address, info.master_port, info.rank_offset, info.world_size) == ("10.0.0.1", 29500, 3, 5)
    assert info.packed and info.packed_buffer_size_bytes == 1 << 20
    assert info.packed_num_buffers == vllm_nccl.NUM_BUFFERS
    assert info.nccl_unique_id_bytes is None  # TCPStore rendezvous, not the unique-id one

    # engine_receive: start -> update -> finish -> reset_prefix_cache; update_info parses as NCCL update info.
    meta = vllm_nccl.TrainerSender.meta([("w", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(3))])
    llm = _RecordingLLM()
    vllm_nccl.engine_receive(llm, meta)
    check_llm_calls(llm)
    assert [c[0] for c in llm.calls] == ["start_weight_update", "update_weights", "finish_weight_update",
                                         "reset_prefix_cache"]
    request = llm.calls[1][1][0]
    assert isinstance(request, WeightTransferUpdateRequest)
    update = NCCLWeightTransferEngine.update_info_cls(**request.update_info)
    assert (update.names, update.dtype_names, update.shapes) == (["w", "b"], ["bfloat16", "float32"], [[2, 3], [3]])

    # TrainerSender: the vLLM functions it calls, bound against their real signatures (NCCL and
    # CUDA streams stubbed out).
    recorded: dict[str, inspect.BoundArguments] = {}

    def recorder(real, result=None):
        def fake(*args, **kwargs):
            recorded[real.__name__] = inspect.signature(real).bind(*args, **kwargs)
            return result
        return fake

    group = SimpleNamespace(destroy=lambda: None)
    monkeypatch.setattr(nccl_common, "trainer_init", recorder(nccl_common.trainer_init, group))
    monkeypatch.setattr(packed_tensor, "packed_nccl_broadcast_producer",
                        recorder(packed_tensor.packed_nccl_broadcast_producer))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: SimpleNamespace(synchronize=lambda: None))
    sender = vllm_nccl.TrainerSender("10.0.0.1", 29500, 5, 1 << 20)
    init = recorded["trainer_init"].arguments
    assert init["rank"] == 0 and init["init_info"] == {"master_address": "10.0.0.1", "master_port": 29500,
                                                        "world_size": 5}
    tensors = [("w", torch.ones(2))]
    sender.send(tensors)
    send = recorded["packed_nccl_broadcast_producer"].arguments
    assert send["group"] is group and send["src"] == 0
    assert (send["buffer_size_bytes"], send["num_buffers"]) == (1 << 20, vllm_nccl.NUM_BUFFERS)
    assert list(send["iterator"]) == tensors and send["post_iter_func"](tensors[0]) is tensors[0][1]
    sender.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (learner on cuda:1, vLLM engine on cuda:0)")
def test_nccl_sync_into_vllm_engine_needs_two_cuda_gpus(models):
    """Zero every weight (greedy output becomes token 0 repeated), then restore the originals
    (the output returns to the first one). Small buckets, so each update spans many of them."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.utils.network_utils import get_open_port

    student = str(models / "student")
    llm = LLM(model=student, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3, seed=0,
              **vllm_nccl.engine_kwargs({}))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def greedy() -> list[int]:
        return list(llm.generate(["12+34="], params, use_tqdm=False)[0].outputs[0].token_ids)

    before = greedy()
    torch.cuda.set_device(1)
    trainer = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16, local_files_only=True).to("cuda:1")
    original = [(name, p.detach().clone()) for name, p in trainer.named_parameters()]
    zeros = [(name, torch.zeros_like(t)) for name, t in original]
    meta = vllm_nccl.TrainerSender.meta(original)
    port, bucket = get_open_port(), 16 << 10
    with ThreadPoolExecutor(max_workers=1) as pool:
        joined = pool.submit(vllm_nccl.engine_init, llm, "127.0.0.1", port, 1, 2, bucket_bytes=bucket)
        sender = vllm_nccl.TrainerSender("127.0.0.1", port, 2, bucket)
        joined.result(timeout=300)

        def sync(named: list[tuple[str, torch.Tensor]]) -> None:
            received = pool.submit(vllm_nccl.engine_receive, llm, meta)
            sender.send(named)
            received.result(timeout=300)

        sync(zeros)
        assert greedy() == [0] * 4
        sync(original)
        assert greedy() == before
    sender.close()
