"""FSDP2 for a model that does not fit one GPU: each rank keeps a shard of the weights, gradients and AdamW's moments."""
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard_model(model, device, master, bf16_traffic=False):
    """FSDP2: each block, then the root (embeddings, ln_f, lm_head), becomes a unit whose weights, gradients and
    AdamW moments are split across the processes, and gathered whole only while the unit computes. Rank 0 alone
    holds the weights whole: each rank allocates its own shards, then takes its part of rank 0's weights, which
    are sent one tensor at a time. bf16_traffic: the blocks gather their weights in bf16, half the bytes, and
    compute in bf16 from input to output; gradients are still summed in fp32 (a bf16 sum over many ranks loses
    precision), and the shards, AdamW and the root stay fp32."""
    whole = model.state_dict() if master else {}
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32, torch.float32) if bf16_traffic else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model)
    model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
