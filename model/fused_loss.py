"""Linear + cross-entropy over chunks of tokens: the LM head and its loss without a [tokens, vocab] tensor.

The plain head computes logits = hidden @ W^T for every token, upcasts them to fp32, and cross-entropy keeps
the fp32 log-softmax [N, V] for backward: 4 * V bytes per token, 2.5 GB per 4096 tokens at a 151k vocabulary
(and the logits, its gradient and the upcast copy come and go beside it).
Here the forward walks over chunks of tokens: each chunk's logits give its tokens' losses and, when autograd
records, at once the chunk's gradients (Liger's way), so no [N, V] tensor is ever whole. Saved for backward:
the gradients of the hidden states [N, H] (the bytes the hidden states took before: nothing else keeps them)
and of the weight [V, H]; the backward only scales them by the incoming gradient.

Why in the forward and not by recomputing the logits in the backward: the loss is the last op of a training
forward and its backward the first op of the backward, so the gradients are alive across no other work; a
recomputing backward allocates the same [N, H] and [V, H] gradients at that same point, plus one more
[N, H] x [H, V] matmul (four for the head instead of three): 11% of the FLOPs of benchmarks/bench_gated_moe.py's
step at a 4096 vocabulary, and 1.09x the plain head's time at 151,936 (bench_loss_memory.py, AMD EPYC). The cost:
a backward that never comes (a loss formed in train mode with autograd on, then dropped) wastes the gradient
matmuls, and a second backward through the same graph is refused.

Imports only torch (exported with the checkpoint as remote code).
"""

import math

import torch


def default_chunk_size(num_tokens: int, vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk: a chunk's fp32 logits about as large as the fp32 hidden states of all tokens, and
    at least 256 tokens so that the matmuls stay large enough to run fast."""
    return max(256, math.ceil(num_tokens * hidden_size / vocab_size))


class LinearCrossEntropySum(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight^T, targets), skipping targets == ignore_index.

    hidden [N, H] and weight [V, H] in any float dtype (the matmul runs in their dtype, as nn.Linear does;
    the softmax in fp32, as transformers' loss upcasts), targets [N] int64. Returns a 0-d fp32 tensor.
    With `with_grad` the forward also forms the gradients of hidden and weight (those that require one) for a
    loss gradient of 1, and the backward scales them by the incoming one, in place: the backward runs once
    (a second one, after retain_graph=True, is refused). The weight's gradient (a tied embedding weight
    included) is summed over the chunks in fp32 at least.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, with_grad):
        valid = targets != ignore_index  # [N]
        safe_targets = torch.where(valid, targets, 0)  # any index: its loss is masked out below
        need_hidden = with_grad and ctx.needs_input_grad[0]
        need_weight = with_grad and ctx.needs_input_grad[1]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        sum_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=sum_dtype, device=weight.device) if need_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.T).float()  # [C, V]
            logsumexp = torch.logsumexp(logits, dim=-1)  # [C]
            target_logits = logits.gather(1, safe_targets[rows, None]).squeeze(1)  # [C]
            loss += ((logsumexp - target_logits) * valid[rows]).sum()
            if not (need_hidden or need_weight):
                continue
            # d(loss)/d(logits) = softmax - one_hot(target), zero on ignored tokens; the softmax overwrites the
            # logits (one [C, V] fp32 buffer per chunk)
            grad_logits = logits.sub_(logsumexp[:, None]).exp_()
            grad_logits.scatter_add_(1, safe_targets[rows, None], grad_logits.new_full((grad_logits.shape[0], 1), -1.0))
            grad_logits *= valid[rows, None]
            grad_logits = grad_logits.to(hidden.dtype)  # back to the matmul dtype, as logits.float()'s backward does
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if need_weight and grad_weight.dtype == hidden.dtype:
                grad_weight.addmm_(grad_logits.T, hidden[rows])  # summed inside the matmul
            elif need_weight:
                grad_weight += grad_logits.T @ hidden[rows]  # a bf16 / fp16 chunk's gradient, summed in fp32
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy's backward runs once: its gradients were formed in the "
                               "forward and are scaled in place (retain_graph=True cannot backward through it twice)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.item()  # a Python number: bf16 gradients are scaled in fp32, not by a bf16-rounded scale
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                grad.mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """The loss transformers' ForCausalLMLoss gives for logits = hidden @ weight^T, without the logits.

    hidden [B, T, H]; labels [B, T] are the input ids (the loss at position t is against labels[t + 1]), or
    shift_labels [B, T] targets already aligned (against shift_labels[t]). The mean over tokens whose target
    is not ignore_index, or the sum divided by num_items_in_batch when given (a whole gradient-accumulation
    batch), exactly as transformers reduces."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    targets = shift_labels.reshape(-1).to(hidden.device)  # [N]
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{targets.shape[0]} targets for {hidden.shape[0]} hidden states: labels must be [B, T]")
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], weight.shape[1])
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum = LinearCrossEntropySum.apply(hidden, weight, targets, ignore_index, chunk_size, with_grad)
    if num_items_in_batch is None:
        return loss_sum / (targets != ignore_index).sum()  # no target at all: 0/0 = nan, as cross_entropy's mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch
