#!/usr/bin/env python3
"""Times PyTorch eager and torch.compile of the UNFUSED modulated norms on the GPU,
for the rows of `instnorm_bench --mod-standard` (bench/device_bench.sh, MOD=1).

Rows are the bench's shape strings, N x C x H x W[...][:fp32|fp16|bf16][:gnG][:affine][:silu]
[:relu][:cl][:ss|:adain][:bwd|:train]:
  :ss     the scale-shift of diffusion U-Nets (guided diffusion's use_scale_shift_norm), with
          scale and shift the two halves of one (N, 2C) embedding, as a ResBlock has them:
              scale, shift = emb.chunk(2, dim=1)
              h = F.group_norm(x, G, w, b) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
              h = F.silu(h)
  :adain  the content side of AdaIN in the form of the widely used reference (calc_mean_std:
          unbiased variance, eps inside the square root), the style's mean and std given
          (computed once per style, as the bench's :adain rows precompute them):
              mean = x.reshape(N, C, -1).mean(2);  std = (x.reshape(N, C, -1).var(2) + eps).sqrt()
              y = (x - mean[..., None, None]) / std[..., None, None] * s_std[..., None, None]
                  + s_mean[..., None, None]
  neither the plain F.group_norm / F.instance_norm (+ SiLU / ReLU), as ../shared/peers/peers.py
          times it, so that the plain rows of the list have their peers in the same run.
The modulation tensors have x's dtype (a model's embedding Linear, or style statistics of a
feature of that dtype, give them so; float32 ones would promote the whole output to float32),
instnorm's rows take float32 (N*C elements either way, beside N*C*H*W). :cl makes x
channels-last (the reference's .view(N, C, -1) becomes .reshape, which copies there, as the
unfused expression on such a tensor must). Affine parameters only where the row has them (:gnG,
:affine), as the bench's rows. :bwd times the backward alone of one retained forward, with the
gradients of x, the affine parameters and the modulation (emb, or s_mean and s_std), as the
bench's :bwd rows ask for dx, dgamma/dbeta and dscale/dshift; :train forward + backward.

Timing as ../shared/peers/peers.py (a copy of its approach, not an import: the device gets only
the checkout): triton.testing.do_bench, which flushes the L2 before every call and times with
CUDA events, median of the runs in 300 ms after 50 ms of warm-up; a device-to-device copy of
the row's minimum bytes (2 tensor volumes forward, 3 :bwd, 5 :train) beside it.

    python3 bench/peers_modulated.py [--out peers_mod.json] [SHAPE ...]   # default: the list below

Writes a JSON list in the format of peers.json (shape, device, mode, bytes_rw, copy_ms,
torch_eager_ms, torch_compile_ms; plus compile_vs_eager, the largest difference of the two
forward outputs), rewritten after every row so that a timeout keeps the rows done, and prints a
table. bench/report.py --mod bench_mod.json --mod-peers peers_mod.json merges it.
"""
import argparse
import json
import os
import sys

import torch
import torch._dynamo  # noqa: F401  (the configs main() sets)
import torch._functorch.config  # noqa: F401
import torch.nn.functional as F
import triton

# instnorm_bench's kModStandard (device_bench.sh passes the binary's own list).
STANDARD = [
    '2x320x64x64:fp16:gn32:silu:cl', '2x320x64x64:fp16:gn32:ss:silu:cl',
    '2x640x32x32:fp16:gn32:silu:cl', '2x640x32x32:fp16:gn32:ss:silu:cl',
    '8x512x64x64:bf16', '8x512x64x64:bf16:adain',
    '4x256x128x128', '4x256x128x128:adain',
    '2x320x64x64:fp16:gn32:silu:cl:bwd', '2x320x64x64:fp16:gn32:ss:silu:cl:bwd',
    '2x640x32x32:fp16:gn32:silu:cl:bwd', '2x640x32x32:fp16:gn32:ss:silu:cl:bwd',
    '8x512x64x64:bf16:bwd', '8x512x64x64:bf16:adain:bwd',
    '4x256x128x128:bwd', '4x256x128x128:adain:bwd']
DT = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
EPS = 1e-5
KNOWN = set(DT) | {'cl', 'silu', 'relu', 'affine', 'ss', 'adain', 'bwd', 'train', 'fwd'}


class Row:
    """One shape string, parsed as instnorm_bench's parse_shape reads it."""

    def __init__(self, spec):
        dims, *opts = spec.split(':')
        for o in opts:
            if o not in KNOWN and not (o.startswith('gn') and o[2:].isdigit()):
                raise ValueError('%s: unknown part %r' % (spec, o))
        self.spec = spec
        self.shape = tuple(int(v) for v in dims.split('x'))
        self.dtype = next((DT[o] for o in opts if o in DT), torch.float32)
        self.groups = next((int(o[2:]) for o in opts if o.startswith('gn')), 0)
        self.affine = 'affine' in opts or self.groups > 0
        self.act = 'silu' if 'silu' in opts else 'relu' if 'relu' in opts else None
        self.cl = 'cl' in opts
        self.mod = 'ss' if 'ss' in opts else 'adain' if 'adain' in opts else None
        self.mode = 'bwd' if 'bwd' in opts else 'train' if 'train' in opts else 'fwd'
        if self.mod == 'adain' and (self.groups or self.affine):
            raise ValueError('%s: :adain is modelled without GroupNorm or affine' % spec)


def activate(h, act):
    return F.silu(h) if act == 'silu' else F.relu(h) if act == 'relu' else h


def per_sample(t, rank):
    """(N, C) -> (N, C, 1, ...) against a tensor of `rank` dimensions."""
    return t.reshape(*t.shape, *([1] * (rank - 2)))


def op_for(row):
    """The unfused expression of a row, a function of its tensors (x, then the parameters)."""
    groups, act = row.groups, row.act

    def norm(x, w, b):
        if groups:
            return F.group_norm(x, groups, w, b, EPS)
        return F.instance_norm(x, weight=w, bias=b, eps=EPS)

    if row.mod is None:
        return lambda x, w, b: activate(norm(x, w, b), act)
    if row.mod == 'ss':
        def scale_shift(x, w, b, emb):
            scale, shift = emb.chunk(2, dim=1)
            h = norm(x, w, b) * (1 + per_sample(scale, x.dim())) + per_sample(shift, x.dim())
            return activate(h, act)
        return scale_shift

    def adain(x, s_mean, s_std):  # calc_mean_std of the content, the style's given
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        mean = per_sample(flat.mean(dim=2), x.dim())
        std = per_sample((flat.var(dim=2) + EPS).sqrt(), x.dim())
        h = (x - mean) / std * per_sample(s_std, x.dim()) + per_sample(s_mean, x.dim())
        return activate(h, act)
    return adain


def tensors_for(row):
    """x (channels-last where the row says :cl) and the expression's parameters, seeded."""
    torch.manual_seed(0)
    grad = row.mode != 'fwd'
    dev, dt = 'cuda', row.dtype
    n, c = row.shape[:2]
    x = torch.randn(row.shape, device=dev, dtype=dt)
    if row.cl:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)
    params = []
    if row.mod != 'adain':
        w = torch.randn(c, device=dev, dtype=dt) if row.affine else None
        b = torch.randn(c, device=dev, dtype=dt) if row.affine else None
        params = [w, b]
    if row.mod == 'ss':
        params.append(0.1 * torch.randn(n, 2 * c, device=dev, dtype=dt))  # emb: scale | shift
    elif row.mod == 'adain':
        params.append(torch.randn(n, c, device=dev, dtype=dt))               # style mean
        params.append(torch.rand(n, c, device=dev, dtype=dt) + 0.5)          # style std
    for t in [x] + params:
        if t is not None:
            t.requires_grad_(grad)
    return x, params


def timed(op, args, mode, gy):
    """The callable to time for a mode: forward, backward of one retained forward, or both."""
    if mode == 'fwd':
        return lambda: op(*args)
    leaves = [t for t in args if t is not None]
    if mode == 'train':
        return lambda: torch.autograd.grad(op(*args), leaves, gy)
    y = op(*args)
    return lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode='median')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.path.join(os.environ.get('OUT', '.'), 'peers_mod.json'))
    ap.add_argument('shapes', nargs='*')
    a = ap.parse_args()
    specs = list(dict.fromkeys(a.shapes or STANDARD))  # each shape once, in order
    rows_in = [Row(s) for s in specs]  # a bad shape fails before anything runs
    torch._dynamo.config.cache_size_limit = 64
    # A compiled backward that donates its buffers cannot be run twice on one graph (:bwd).
    torch._functorch.config.donated_buffer = False
    rows = []
    for row in rows_in:
        op = op_for(row)
        compiled = torch.compile(op, dynamic=False)
        x, params = tensors_for(row)
        args = [x] + params
        gy = torch.randn_like(x) if row.mode != 'fwd' else None
        volumes = {'fwd': 2, 'bwd': 3, 'train': 5}[row.mode]
        src = torch.empty(x.numel() * volumes // 2, device='cuda', dtype=row.dtype)
        dst = torch.empty_like(src)
        out = {'shape': row.spec, 'device': torch.cuda.get_device_name(), 'mode': row.mode,
               'modulation': row.mod or 'none', 'bytes_rw': volumes * x.numel() * x.element_size()}
        out['copy_ms'] = bench(lambda: dst.copy_(src))
        out['torch_eager_ms'] = bench(timed(op, args, row.mode, gy))
        try:
            out['torch_compile_ms'] = bench(timed(compiled, args, row.mode, gy))
            if row.mode == 'fwd':  # (no_grad would recompile: nothing needs grad here)
                out['compile_vs_eager'] = (compiled(*args).float() - op(*args).float()
                                           ).abs().max().item()
        except Exception as e:  # noqa: BLE001  (a compiled backward that cannot be retained)
            out['torch_compile_ms'] = float('nan')
            out['compile_error'] = str(e)[:200]
        rows.append(out)
        x = params = args = src = dst = gy = None  # freed before the next row
        torch.cuda.empty_cache()
        print(json.dumps(out), flush=True)
        with open(a.out, 'w') as f:
            json.dump(rows, f, indent=1)
    print('\n| shape | copy ms | eager ms | compile ms | copy GB/s |')
    print('|---|---|---|---|---|')
    for r in rows:
        print('| %s | %.4f | %.4f | %.4f | %.0f |' % (r['shape'], r['copy_ms'], r['torch_eager_ms'],
              r['torch_compile_ms'], r['bytes_rw'] / r['copy_ms'] / 1e6))


if __name__ == '__main__':
    sys.exit(main())
