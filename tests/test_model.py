import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from machinery.world import World, device_type, init_device
from train_gpt2 import CausalSelfAttention, GPT, GPTConfig, pick_device

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_from_pretrained_copies_every_tensor(hf_checkpoint):
    path = hf_checkpoint(n_layer=3, n_head=2, n_embd=16, vocab_size=100, n_positions=32)
    model = GPT.from_pretrained(path)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (3, 2, 16)
    assert (model.config.vocab_size, model.config.block_size) == (100, 32)
    sd = model.state_dict()
    sd_hf = GPT2LMHeadModel.from_pretrained(path).state_dict()
    n = 0
    for k, w in sd_hf.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        expected = w.t() if k.endswith(CONV1D) else w
        assert torch.equal(sd[k], expected), k
        n += 1
    assert n == 4 + 12 * 3 + 1  # wte, wpe, ln_f (2); 12 per block; lm_head


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'gpt3'.*gpt2-xl"):
        GPT.from_pretrained("gpt3")


def test_mismatched_checkpoint_names_the_tensor(hf_checkpoint):
    path = hf_checkpoint(n_inner=48)  # an MLP width GPT-2 does not have (4 * 32 = 128)
    with pytest.raises(ValueError, match=r"does not fit the model: transformer\.h\.0\.mlp\.c_fc\.weight has shape \(48, 32\), the model.s is \(128, 32\)"):
        GPT.from_pretrained(path)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load a GPT-2 checkpoint from"):
        GPT.from_pretrained(str(tmp_path))


def test_import_has_no_side_effects(tmp_path):
    code = ("import sys, torch.distributed as dist; import train_gpt2; "
            "assert not dist.is_initialized(); print('ok')")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"  # nothing printed, nothing trained
    assert os.listdir(tmp_path) == []  # no files written


@pytest.mark.parametrize("shape", [
    dict(n_layer=4, n_head=4, n_embd=32, vocab_size=50257, n_positions=64),  # the full vocabulary
    dict(n_layer=2, n_head=2, n_embd=24, vocab_size=300, n_positions=16),
])
def test_logits_match_transformers(hf_checkpoint, shape):
    path = hf_checkpoint(seed=1, **shape)
    ours = GPT.from_pretrained(path).eval()
    theirs = GPT2LMHeadModel.from_pretrained(path).eval()
    T = shape["n_positions"]
    idx = torch.randint(0, shape["vocab_size"], (3, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = ours(idx)
        expected = theirs(idx).logits
    assert loss is None
    assert logits.shape == (3, T, shape["vocab_size"])
    assert (logits - expected).abs().max().item() < 1e-5


def test_loss_is_mean_cross_entropy(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint()).eval()
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 128, (2, 2, 10), generator=g)
    with torch.no_grad():
        logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits, dim=-1)
    expected = -logp.gather(-1, targets.unsqueeze(-1)).mean()
    assert abs(loss.item() - expected.item()) < 1e-6


def test_sequence_longer_than_block_size_is_a_clear_error(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint(n_positions=8))
    with pytest.raises(ValueError, match="sequence of length 9 is longer than block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_the_device_is_the_fastest_there_is_or_the_one_asked_for_and_is_checked(monkeypatch):
    assert pick_device("auto") == "cpu" and init_device(pick_device("auto")) == "cpu"  # the tests hide any GPU
    assert pick_device("cpu") == init_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        init_device("gpu0")
    with pytest.raises(ValueError, match="device 'cuda' asked for, but this torch sees no CUDA GPU here: use --device cpu"):
        init_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as if on a GPU machine
    assert pick_device("auto") == "cuda" and pick_device("mps") == "mps"


def test_weight_tying_and_the_124M_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(GPTConfig(vocab_size=50257))
    assert model.lm_head.weight is model.transformer.wte.weight
    n = sum(p.numel() for p in model.parameters())  # parameters() counts a shared tensor once
    assert n == 124_439_808
    # the state dict names the shared tensor twice (wte and lm_head): one 50257 x 768 matrix saved
    assert sum(t.numel() for t in model.state_dict().values()) - n == 50257 * 768


def test_tied_weights_survive_loading(hf_checkpoint):
    model = GPT.from_pretrained(hf_checkpoint())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, GPT2LMHeadModel.from_pretrained(hf_checkpoint()).lm_head.weight)


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    L = 8
    model = GPT(GPTConfig(block_size=256, vocab_size=4096, n_layer=L, n_head=4, n_embd=256))
    residual = 0.02 / (2 * L) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            assert abs(p.std().item() - residual) < 0.05 * residual, name
            assert abs(p.mean().item()) < 1e-3, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) < 0.001, name
            assert abs(p.mean().item()) < 1e-3, name
        elif "ln_" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert name.endswith("bias") and torch.all(p == 0), name


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_causal_sdpa_equals_explicit_masked_softmax_attention(dtype, tol):
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(block_size=16, n_head=4, n_embd=32)).to(dtype)
    x = torch.randn(3, 16, 32, dtype=dtype)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / (C // 4) ** 0.5
    att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(dim=-1)
    expected = attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
    with torch.no_grad():
        assert (attn(x) - expected).abs().max().item() < tol


def test_state_dict_holds_no_attention_mask():
    model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=32))
    assert not [k for k in model.state_dict() if k.endswith((".attn.bias", ".attn.masked_bias"))]
    assert not list(model.buffers())


def test_forward_takes_slices_of_one_tensor_as_inputs_and_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 64, (3, 17))
    logits, loss = model(idx[:, :-1], idx[:, 1:])  # neither slice is contiguous
    expected_logits, expected = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    assert torch.equal(logits, expected_logits) and torch.equal(loss, expected)


def test_a_process_on_gpu_3_drives_cuda_3_and_its_device_type_is_cuda():
    # what autocast and the fused kernels are given: the kind of device, never 'cuda:3' (older torch refused an index
    # in autocast, upstream #16 and #44; torch 2.13 takes both, so no test here can show that refusal)
    world = World(rank=3, local_rank=3, world_size=8, ddp=True, device="cuda:3")
    assert (world.device, world.device_type, world.master) == ("cuda:3", "cuda", False)
    assert World(device="mps").device_type == "mps" and World().device_type == "cpu"
    assert device_type("cuda:0") == "cuda" and device_type("cpu") == "cpu"
