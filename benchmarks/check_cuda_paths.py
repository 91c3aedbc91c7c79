"""CUDA paths against the torch paths, on a GPU machine: same numbers within bf16 tolerance, and timings.

    python benchmarks/check_cuda_paths.py            # needs CUDA; flash-linear-attention optional

1. DeltaProduct kernel: flash-linear-attention's chunk_gated_delta_product (when installed) and our torch
   chunk kernel on CUDA in bf16, against our recurrence in float64 on the same inputs; forward and the
   gradients of q, k, v, beta, g. Then forward+backward time of both at a long sequence.
2. Both model families in bf16 on CUDA (sdpa; flash_attention_2 when flash-attn is installed) against the
   same weights in fp32: loss and logits within bf16 tolerance.
3. Packed documents under flex_attention and varlen_attention against sdpa's dense document mask, both
   families in bf16: loss and gradients (benchmarks/gpu_check.sh runs the same models through the trainer).
4. Training-step throughput and MFU (bf16, AdamW) for a dense gated-attention model, the MoE and a
   DeltaProduct model at sizes that keep the GPU busy; MFU against the dense bf16 peak given by --peak-tflops.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seedlm import model  # noqa: E402
from seedlm.launch.presets import build_model_config  # noqa: E402
from seedlm.model import delta_product_kernels as kernels  # noqa: E402


def max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12)).item()


def kernel_inputs(B, T, H, K, V, n, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T * n, H, K, generator=g), dim=-1)
    v = torch.randn(B, T * n, H, V, generator=g)
    beta = torch.rand(B, T * n, H, generator=g) * 2  # negative eigenvalues
    decay = -torch.rand(B, T, H, generator=g) * 0.1
    return [x.to(device=device, dtype=dtype if x is not decay else torch.float32) for x in (q, k, v, beta, decay)]


def check_kernels(args) -> None:
    print("## DeltaProduct kernel on CUDA (bf16 inputs) vs float64 recurrence\n")
    print("| n_h | backend | rel. error o | rel. error grads (max over q,k,v,beta,g) |")
    print("|---|---|---|---|")
    fla_ok = kernels._fla_chunk_gated_delta_product is not None
    backward_ok = {"torch": True, "fla": True}
    for n in (1, 2, 3):
        inputs = kernel_inputs(2, 300, 4, 64, 64, n, "cpu", torch.float64)
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        o_ref, _ = kernels.recurrent_delta_product(*leaves, num_householder=n)
        probe = torch.randn_like(o_ref)
        ref_grads = torch.autograd.grad((o_ref * probe).sum(), leaves)
        for backend in ("torch", "fla") if fla_ok else ("torch",):
            leaves = [x.to("cuda", torch.bfloat16 if i < 4 else torch.float32).requires_grad_(True)
                      for i, x in enumerate(inputs)]
            o, _ = kernels.chunk_delta_product(*leaves, num_householder=n, backend=backend)
            try:
                grads = torch.autograd.grad((o.float() * probe.cuda().float()).sum(), leaves)
                grad_err = f"{max(max_rel_error(a.cpu(), b) for a, b in zip(grads, ref_grads)):.2e}"
            except RuntimeError as err:  # e.g. fla refusing its gated backward on some Triton/GPU pairs
                grad_err = f"backward refused: {str(err).splitlines()[0][:110]}"
                backward_ok[backend] = False
            print(f"| {n} | {backend} | {max_rel_error(o.cpu(), o_ref):.2e} | {grad_err} |")
    args.fla_backward_ok = fla_ok and backward_ok["fla"]
    if not fla_ok:
        print("\nflash-linear-attention is not installed: only the torch path was checked")
        return
    with_backward = all(backward_ok.values())
    what = "forward+backward" if with_backward else "forward only (a backward was refused above)"
    print(f"\n## Kernel {what} time, bf16, B=4, T=4096, H=8, K=V=128\n")
    print("| n_h | torch chunk (ms) | fla (ms) | fla speed-up |")
    print("|---|---|---|---|")
    for n in (1, 2, 3):
        inputs = kernel_inputs(4, 4096, 8, 128, 128, n, "cuda", torch.bfloat16)
        times = {}
        for backend in ("torch", "fla"):
            leaves = [x.clone().requires_grad_(True) for x in inputs]
            for i in range(args.repeats + 2):
                if i == 2:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                if with_backward:
                    o, _ = kernels.chunk_delta_product(*leaves, num_householder=n, backend=backend)
                    o.float().sum().backward()
                else:
                    with torch.no_grad():
                        kernels.chunk_delta_product(*leaves, num_householder=n, backend=backend)
            torch.cuda.synchronize()
            times[backend] = 1000 * (time.perf_counter() - start) / args.repeats
        print(f"| {n} | {times['torch']:.1f} | {times['fla']:.1f} | {times['torch'] / times['fla']:.1f}x |")


MODEL_CASES = {  # small models of both families, for the parity checks
    "gated MoE": dict(model_type="seedlm_gated_moe", vocab_size=4096, hidden_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=256, shared_expert_intermediate_size=256, max_position_embeddings=2048),
    "DeltaProduct hybrid": dict(model_type="seedlm_deltaproduct", vocab_size=4096, hidden_size=512,
                                num_hidden_layers=4, num_heads=4, head_dim=128, num_householder=2,
                                attn_layers=[3], attn_num_heads=4, attn_num_kv_heads=2, initializer_range=0.02,
                                max_position_embeddings=2048),
}


def check_models(args) -> None:
    print("\n## Models in bf16 on CUDA vs fp32, same weights\n")
    print("| model | attention | fp32 loss | bf16 loss | max |logit diff| / max |logit| |")
    print("|---|---|---|---|---|")
    attn = "flash_attention_2" if args.flash_attn else "sdpa"
    for name, fields in MODEL_CASES.items():
        config = build_model_config(fields)
        torch.manual_seed(0)
        net = model.__dict__[("GatedMoe" if "MoE" in name else "DeltaProduct") + "ForCausalLM"](config)
        ids = torch.randint(0, 4096, (2, 512), device="cuda")
        ref = net.float().cuda().eval()
        with torch.no_grad():
            out32 = ref(ids, labels=ids)
        ref.config._attn_implementation = attn
        low = ref.to(torch.bfloat16)
        with torch.no_grad():
            out16 = low(ids, labels=ids)
        diff = max_rel_error(out16.logits.float(), out32.logits.float())
        print(f"| {name} | {attn} | {out32.loss.item():.4f} | {out16.loss.item():.4f} | {diff:.2e} |")


def check_document_masking(args) -> None:
    print("\n## Packed documents without a dense mask, bf16 on CUDA, vs sdpa with the dense mask\n")
    print("| model | attention | loss (dense mask) | loss | max rel. error of the gradients |")
    print("|---|---|---|---|---|")
    T = 2048
    # four documents per row, of different lengths; positions restart at 0 where a document starts
    lengths = [700, 100, 1000, 248]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].expand(2, -1).cuda()
    for name, fields in MODEL_CASES.items():
        config = build_model_config(fields)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().train()
        ids = torch.randint(0, 4096, (2, T), device="cuda")
        results = {}
        for attn in ("sdpa", "flex_attention", "varlen_attention"):
            net.config._attn_implementation = attn
            net.zero_grad(set_to_none=True)
            try:
                loss = net(ids, position_ids=position_ids, labels=ids).loss
                loss.backward()
            except Exception as err:  # report and go on: the other kernels still get checked
                print(f"| {name} | {attn} | | failed: {type(err).__name__}: {str(err)[:120]} | |")
                continue
            results[attn] = (loss.item(), {n: p.grad.float() for n, p in net.named_parameters() if p.grad is not None})
            if attn != "sdpa" and "sdpa" in results:
                ref_loss, ref_grads = results["sdpa"]
                grad_err = max(max_rel_error(g, ref_grads[n]) for n, g in results[attn][1].items())
                print(f"| {name} | {attn} | {ref_loss:.4f} | {loss.item():.4f} | {grad_err:.2e} |")
        del net, results
        torch.cuda.empty_cache()


def throughput(args) -> None:
    print(f"\n## Training step throughput, bf16, AdamW, one GPU (MFU vs {args.peak_tflops:.0f} TFLOP/s)\n")
    print("| model | parameters (active) | batch x seq | tokens/s | MFU |")
    print("|---|---|---|---|---|")
    if not getattr(args, "fla_backward_ok", False) and kernels._fla_chunk_gated_delta_product is not None:
        kernels._fla_chunk_gated_delta_product = None  # its backward is unusable here: train on the torch path
        print("(DeltaProduct trains on the torch chunk kernel: fla's backward was refused on this machine)\n")

    cases = {
        "dense gated attention": (dict(model_type="seedlm_gated_moe", vocab_size=32000, hidden_size=2048,
                                       num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                                       head_dim=128, intermediate_size=6144, num_experts=0), 8, 2048),
        "gated MoE": (dict(model_type="seedlm_gated_moe", vocab_size=32000, hidden_size=2048, num_hidden_layers=12,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=64,
                           num_experts_per_tok=8, moe_intermediate_size=768), 8, 2048),
        "DeltaProduct_2": (dict(model_type="seedlm_deltaproduct", vocab_size=32000, hidden_size=2048,
                                num_hidden_layers=16, num_heads=16, head_dim=128, num_householder=2,
                                intermediate_size=5632, initializer_range=0.006), 8, 2048),
    }
    for name, (fields, batch, seq) in cases.items():
        config = build_model_config(fields)
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, 32000, (batch, seq), device="cuda")
        for i in range(args.repeats + 2):
            if i == 2:
                torch.cuda.synchronize()
                start = time.perf_counter()
            net(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        tokens_per_sec = batch * seq * args.repeats / (time.perf_counter() - start)
        mfu = tokens_per_sec * config.flops_per_token(seq) / (args.peak_tflops * 1e12)
        counts = config.parameter_counts()
        print(f"| {name} | {counts.total / 1e9:.2f}B ({counts.active / 1e9:.2f}B) | {batch}x{seq} | "
              f"{tokens_per_sec:,.0f} | {100 * mfu:.1f}% |")
        del net, opt
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "models", "masking", "throughput"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this check runs on a GPU machine")
        return 1
    try:
        import flash_attn  # noqa: F401

        args.flash_attn = True
    except ImportError:
        args.flash_attn = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, flash-attn "
          f"{'installed' if args.flash_attn else 'not installed'}, flash-linear-attention "
          f"{'installed' if kernels._fla_chunk_gated_delta_product is not None else 'not installed'}\n")
    if "kernels" not in args.skip:
        check_kernels(args)
    if "models" not in args.skip:
        check_models(args)
    if "masking" not in args.skip:
        check_document_masking(args)
    if "throughput" not in args.skip:
        throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
