"""The output layer and the cross-entropy a chunk of positions at a time (--loss_chunks): the (B*T, vocab) logits never
exist whole. At B=64, T=1024 they are 3.3 billion numbers, 6 GiB in bf16, and the loss's fp32 copy and gradient 25 more:
the largest single use of memory in GPT-2 124M's step."""
import torch
from torch.nn import functional as F


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(x @ weight.T, targets)), chunk by chunk. The loss ends the graph, so each chunk's gradient
    (softmax minus one-hot, over N) is known as soon as its logits are: forward computes it at once and keeps only
    the gradients of x and weight, which backward scales. The matmuls run in dtype (bf16 under autocast) as lm_head
    would run them; the softmax in fp32, as autocast runs the loss."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunks, dtype, needs_grad):
        N = x.size(0)
        w = weight.to(dtype)
        loss = torch.zeros((), device=x.device)
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros_like(weight) if needs_grad else None
        size = -(-N // chunks)  # rows a chunk, the last one perhaps fewer
        for i in range(0, N, size):
            xc, t = x[i:i + size].to(dtype), targets[i:i + size]
            logits = (xc @ w.t()).float()
            loss += F.cross_entropy(logits, t, reduction="sum")
            if needs_grad:
                grad = logits.softmax(-1)
                grad[torch.arange(len(t), device=x.device), t] -= 1
                grad = (grad / N).to(dtype)
                grad_x[i:i + size] = (grad @ w).to(x.dtype)
                grad_w += (grad.t() @ xc).to(weight.dtype)
        ctx.save_for_backward(grad_x, grad_w)
        # the mean over the targets that count: an evaluation masks rows past its set with -100, cross_entropy's
        # ignore_index (without gradients: a step that trains has no masked targets, and its gradients assume none)
        return loss / (N if needs_grad else (targets != -100).sum())

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None, None


def chunked_cross_entropy(x, weight, targets, chunks):
    """The mean cross-entropy of the logits x @ weight.T (x: (N, C), weight: (vocab, C)) against targets (N,), in
    chunks of about N / chunks rows: the same loss and gradients as the plain way, within rounding."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):  # the dtypes above are the ones used, not autocast's again
        return ChunkedCrossEntropy.apply(x, weight, targets, chunks, dtype, needs_grad)
