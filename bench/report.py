#!/usr/bin/env python3
"""Turns one device run into BENCHMARKS.md's table and plot.

    python3 bench/report.py --bench bench.json [--bench2 bench2.json] --peers peers.json \
        [--sweep sweep.json] [--mod bench_mod.json --mod-peers peers_mod.json] \
        --commit $(git rev-parse --short HEAD) --out-md table.md --out-png docs/benchmarks.png

bench.json is instnorm_bench's --benchmark_out (JSON); peers.json comes from
../shared/peers/peers.py run in the same device call. With --bench2 (a second, back-to-back bench
run) the table gains the run-to-run difference of instnorm's time per row. With --sweep
sweep.json (instnorm_bench --sweep=K, bench/device_bench.sh's SWEEP=K) the page gains the
sweep's section: min / median / max of `of copy`, the minimum over shapes of 64 MiB or more,
and every shape; --sweep alone (no --bench) writes that section only.
With --mod bench_mod.json (instnorm_bench --mod-standard, device_bench.sh's MOD=1: the four
modulated standard rows and the same shapes without modulation, in rounds) and --mod-peers
peers_mod.json (bench/peers_modulated.py, same device call) the page gains the modulation
section: per row the medians over rounds, the cost of the modulation as the median over rounds
of modulated / plain time of the same round, and PyTorch eager and torch.compile of the unfused
expression; --mod alone writes that section only.

Each row's copy (the floor) is timed in the row's own loop, alternating with the row's call
(counters copy_ms, copy_GBps, copy_remeasured); JSON from before that change has separate copy/
rows instead, which are read where the counters are missing.
"""
import argparse
import json
import statistics


def load_bench(path):
    rows, ctx = {}, {}
    with open(path) as f:
        d = json.load(f)
    ctx = d.get('context', {})
    for b in d['benchmarks']:
        kind, shape = b['name'].split('/')[:2]
        if b.get('error_occurred'):
            continue
        rows.setdefault(shape, {})[kind] = b
    return rows, ctx


def copy_of(row, kind='instnorm'):
    """The row's copy (floor) as (ms, GB/s, re-measured): its own counters, or for older JSON
    the separate copy/ row of the same shape."""
    b = row.get(kind, {})
    if 'copy_ms' in b:
        return b['copy_ms'], b.get('copy_GBps'), b.get('copy_remeasured', 0) > 0
    if 'copy' in row:
        return row['copy']['ms'], row['copy'].get('GBps'), False
    return None, None, False


def shape_bytes(shape):
    """Tensor bytes of a shape string (NxCxHxW[:fp16|:bf16][...])."""
    parts = shape.split(':')
    n = 1
    for d in parts[0].split('x'):
        n *= int(d)
    return n * (2 if ('fp16' in parts or 'bf16' in parts) else 4)


def sweep_section(path):
    """Markdown lines for an instnorm_bench --sweep=K run: the summary, then each shape from the
    lowest fraction of the copy up, then the shapes that were not timed."""
    with open(path) as f:
        d = json.load(f)
    ctx = d.get('context', {})
    done, failed = [], []
    for b in d['benchmarks']:
        kind, shape = b['name'].split('/')[:2]
        if kind != 'sweep':
            continue
        if b.get('error_occurred') or 'of_copy' not in b:
            failed.append((shape, b.get('error_message', 'not timed')))
        else:
            done.append((b['of_copy'], shape, b))
    done.sort()
    lines = ['', '## Sweep: %s random shapes, seed %s' % (ctx.get('sweep_k', '?'), ctx.get('sweep_seed', '?')),
             '']
    lines.append('Shapes drawn by `instnorm_bench --sweep=K[:seed]` (the distribution is in the '
                 'README\'s benchmark section), each timed as the rows above, alternating with its '
                 'copy. GPU: %s; steady copy %s GB/s.' % (ctx.get('gpu', '?'), steady_text(ctx)))
    lines.append('')
    if done:
        fr = [x[0] for x in done]
        big = [x[0] for x in done if shape_bytes(x[1]) >= 64 << 20]
        lines.append('`of copy` over %d shapes: min %.3f, median %.3f, max %.3f; min over the %d '
                     'shapes of 64 MiB or more: %s.' %
                     (len(fr), min(fr), statistics.median(fr), max(fr), len(big),
                      ('%.3f' % min(big)) if big else 'n/a'))
        lines.append('')
        lines.append('| shape | MiB | of copy | instnorm ms | copy ms | copy GB/s | plan |')
        lines.append('|---|---|---|---|---|---|---|')
        for frac, shape, b in done:
            lines.append('| %s | %.1f | %.3f | %.4f | %.4f | %.0f%s | %s |' %
                         (shape, shape_bytes(shape) / 2**20, frac, b['ms'], b['copy_ms'],
                          b['copy_GBps'], '*' if b.get('copy_remeasured', 0) > 0 else '',
                          b.get('label', '')))
        lines.append('')
        lines.append('\\* the copy was more than 3% off the steady rate and the row was measured '
                     'again (the measurement kept is the one whose copy was closest to it).')
    for shape, why in failed:
        lines.append('')
        lines.append('Not timed: %s (%s)' % (shape, why))
    return lines


MOD_TAGS = ('ss', 'adain')


def mod_base(shape):
    """The plain shape of a modulated row (its :ss / :adain left out), or None for a plain row."""
    parts = shape.split(':')
    if not any(t in parts for t in MOD_TAGS):
        return None
    return ':'.join(x for x in parts if x not in MOD_TAGS)


def mod_section(path, peers_path=None):
    """Markdown lines for an instnorm_bench --mod-standard run (every row in K rounds, each
    modulated row right after its plain shape): per row the median over rounds of its median
    time and of_copy; for a modulated row its cost, the median over rounds of (modulated / plain
    - 1) within the same round, with the range over rounds; the peers of the unfused expression
    (peers_modulated.py) beside it."""
    with open(path) as f:
        d = json.load(f)
    ctx = d.get('context', {})
    peers = {}
    if peers_path:
        with open(peers_path) as f:
            peers = {r['shape']: r for r in json.load(f)}
    runs, errors = {}, {}
    for b in d['benchmarks']:
        kind, shape = b['name'].split('/')[:2]
        if kind != 'instnorm' or b.get('run_type') == 'aggregate':
            continue
        ok = not b.get('error_occurred') and 'ms' in b
        runs.setdefault(shape, []).append(b if ok else None)
        if not ok:
            errors[shape] = b.get('error_message', 'not timed')

    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def fmt(v, spec='%.4f'):
        return spec % v if v is not None else 'n/a'

    rounds = max((len(v) for v in runs.values()), default=0)
    lines = ['', '## Per-sample modulation', '']
    lines.append('`instnorm_bench --mod-standard`: each modulated row (`:ss` scale-shift '
                 'GroupNorm, `(1 + scale)` and shift the halves of one (N, 2C) float embedding; '
                 '`:adain` the content side of AdaIN, unbiased variance, the style\'s std and mean '
                 'precomputed) timed right after the same shape without modulation, the whole '
                 'list %d times. `ms` and `of copy`: medians over the rounds of each round\'s '
                 'median; `cost`: median over rounds of modulated / plain time of the same round, '
                 'minus 1 (range over rounds in brackets); `:bwd` rows time the backward alone, '
                 'the modulated ones with dscale/dshift. Eager and compile: PyTorch of the '
                 'unfused expression (bench/peers_modulated.py), same device call. GPU: %s; '
                 'steady copy %s GB/s.' % (rounds, ctx.get('gpu', '?'), steady_text(ctx)))
    lines.append('')
    lines.append('| row | ms | of copy | plain ms | cost | eager ms | compile ms | plan |')
    lines.append('|---|---|---|---|---|---|---|---|')
    over, behind = [], []
    for shape, rs in runs.items():
        if shape in errors:
            lines.append('| %s | ERROR: %s | | | | | | |' % (shape, errors[shape]))
            continue
        t = med([b['ms'] for b in rs])
        frac = med([b.get('of_copy') for b in rs])
        base = mod_base(shape)
        base_ms, cost = None, None
        if base is not None and base in runs and base not in errors:
            brs = runs[base]
            base_ms = med([b['ms'] for b in brs])
            ratios = [m['ms'] / p['ms'] - 1 for m, p in zip(rs, brs)]
            c = statistics.median(ratios)
            cost = '%+.1f%% [%+.1f, %+.1f]' % (100 * c, 100 * min(ratios), 100 * max(ratios))
            if c > 0.03:
                over.append(shape)
        elif base is None:
            cost = '(plain)'
        p = peers.get(shape, {})
        eager, comp = p.get('torch_eager_ms'), p.get('torch_compile_ms')
        if base is not None and t is not None:
            if any(v is not None and v == v and v <= t for v in (eager, comp)):
                behind.append(shape)
        lines.append('| %s | %s | %s | %s | %s | %s | %s | %s |' %
                     (shape, fmt(t), fmt(frac, '%.3f'), fmt(base_ms) if base else '',
                      cost or 'n/a', fmt(eager),
                      fmt(comp), rs[-1].get('label', '')))
    lines.append('')
    mods = [s for s in runs if mod_base(s) is not None]
    lines.append('The modulation\'s bar (cost at most 3%%, faster than eager and torch.compile of the '
                 'unfused expression): %d modulated rows; over 3%%: %s; not ahead of both peers: '
                 '%s.' % (len(mods), ', '.join(over) or 'none',
                          (', '.join(behind) or 'none') if peers else 'no peers given'))
    return lines


def steady_text(ctx):
    v = ctx.get('steady_copy_GBps')
    return '%.0f' % float(v) if v else 'n/a'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--bench')
    ap.add_argument('--sweep')
    ap.add_argument('--bench2')
    ap.add_argument('--peers')
    ap.add_argument('--mod')
    ap.add_argument('--mod-peers')
    ap.add_argument('--commit', default='?')
    ap.add_argument('--date', default='?')
    ap.add_argument('--driver', default='?')
    ap.add_argument('--out-md', required=True)
    ap.add_argument('--out-png')
    a = ap.parse_args()
    if not a.bench and not a.sweep and not a.mod:
        ap.error('give --bench, --sweep, --mod or several')
    if a.mod_peers and not a.mod:
        ap.error('--mod-peers goes with --mod')
    if not a.bench:
        lines = []
        if a.sweep:
            lines.extend(sweep_section(a.sweep))
        if a.mod:
            lines.extend(mod_section(a.mod, a.mod_peers))
        with open(a.out_md, 'w') as f:
            f.write('\n'.join(lines[1:]) + '\n')
        return

    rows, ctx = load_bench(a.bench)
    rows2 = load_bench(a.bench2)[0] if a.bench2 else {}
    peers = {}
    if a.peers:
        with open(a.peers) as f:
            peers = {r['shape']: r for r in json.load(f)}

    def ms(row, kind):
        return row[kind]['ms'] if kind in row else None

    def fmt(v, digits=4):
        return ('%.*f' % (digits, v)) if v is not None else 'n/a'

    lines = []
    if 'steady_copy_GBps' in ctx:
        floor = ('device-to-device copy time of the same bytes / instnorm time, both medians of '
                 'one loop that alternates them (flush, copy, flush, instnorm; 1.0 = the floor of '
                 'one read and one write). The run\'s steady copy rate (1 GiB): %s GB/s; `copy '
                 'GB/s` marked * was more than 3%% off it and re-measured (the measurement whose '
                 'copy came closest is kept).' % steady_text(ctx))
    else:  # JSON of a run with separate copy/ rows
        floor = ('same-run device-to-device copy time / instnorm time (1.0 = the floor of one '
                 'read and one write).')
    lines.append('GPU: %s, driver %s, commit %s, date %s. Times are medians in ms with the L2 '
                 'flushed before every run; `of copy` = %s' %
                 (ctx.get('gpu', '?'), a.driver, a.commit, a.date, floor))
    lines.append('')
    head = ['shape', 'instnorm ms', 'GB/s', 'of copy', 'copy ms', 'copy GB/s', 'naive ms',
            'cuDNN ms', 'PyTorch eager ms', 'torch.compile ms', 'Triton start ms', 'plan']
    if rows2:
        head.insert(4, 'rerun diff')
    lines.append('| ' + ' | '.join(head) + ' |')
    lines.append('|' + '---|' * len(head))
    plot = []
    worst = (0.0, '')
    for shape, row in rows.items():
        if 'instnorm' not in row:
            continue
        t = ms(row, 'instnorm')
        p = peers.get(shape, {})
        copy, copy_gbps, remeasured = copy_of(row)
        frac = row['instnorm'].get('of_copy')
        cells = [shape, fmt(t), '%.0f' % row['instnorm']['GBps'], fmt(frac, 3), fmt(copy),
                 ('%.0f' % copy_gbps + ('*' if remeasured else '')) if copy_gbps else 'n/a',
                 fmt(ms(row, 'naive')), fmt(ms(row, 'cudnn')), fmt(p.get('torch_eager_ms')),
                 fmt(p.get('torch_compile_ms')), fmt(p.get('seed_triton_ms')),
                 row['instnorm'].get('label', '')]
        if rows2:
            t2 = ms(rows2.get(shape, {}), 'instnorm')
            diff = abs(t2 - t) / t if t2 else None
            cells.insert(4, ('%.1f%%' % (100 * diff)) if diff is not None else 'n/a')
            if diff is not None and diff > worst[0]:
                worst = (diff, shape)
        lines.append('| ' + ' | '.join(cells) + ' |')
        fr = {'instnorm': frac}
        if copy:
            for name, key in [('PyTorch eager', 'torch_eager_ms'), ('torch.compile', 'torch_compile_ms'),
                              ('Triton start', 'seed_triton_ms')]:
                if p.get(key):
                    fr[name] = copy / p[key]
            for name, kind in [('naive', 'naive'), ('cuDNN', 'cudnn')]:
                # Each baseline row has its own alternating copy; older JSON: the shared one.
                if kind in row and row[kind].get('of_copy'):
                    fr[name] = row[kind]['of_copy']
                elif ms(row, kind):
                    fr[name] = copy / ms(row, kind)
        plot.append((shape, fr))
    if rows2:
        lines.append('')
        lines.append('Two back-to-back bench runs: the largest difference of instnorm\'s time is '
                     '%.1f%% (%s).' % (100 * worst[0], worst[1]))
    # Feature rows against their plain shape of the same run.
    tags = ('affine', 'save', 'relu', 'running', 'eval')
    feat = []
    for shape, row in rows.items():
        parts = shape.split(':')
        if 'instnorm' not in row or not any(t in parts for t in tags):
            continue
        base = ':'.join(x for x in parts if x not in tags)
        if base in rows and 'instnorm' in rows[base]:
            t, tb = ms(row, 'instnorm'), ms(rows[base], 'instnorm')
            feat.append('| %s | %s | %s | %+.1f%% |' % (shape, fmt(tb), fmt(t), 100 * (t / tb - 1)))
    if feat:
        lines.append('')
        lines.append('Features against the plain call on the same shape, same run:')
        lines.append('')
        lines.append('| shape | plain ms | with features ms | overhead |')
        lines.append('|---|---|---|---|')
        lines.extend(feat)
    if a.sweep:
        lines.extend(sweep_section(a.sweep))
    if a.mod:
        lines.extend(mod_section(a.mod, a.mod_peers))
    with open(a.out_md, 'w') as f:
        f.write('\n'.join(lines) + '\n')

    if a.out_png and plot:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        names = ['instnorm', 'torch.compile', 'PyTorch eager', 'cuDNN', 'naive', 'Triton start']
        fig, ax = plt.subplots(figsize=(14, 6))
        w = 0.8 / len(names)
        for i, n in enumerate(names):
            xs = [j + i * w for j in range(len(plot))]
            ys = [fr.get(n, 0) or 0 for _, fr in plot]
            ax.bar(xs, ys, width=w, label=n)
        ax.axhline(0.9, color='k', linestyle='--', linewidth=1, label='0.90 of copy')
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(plot))])
        ax.set_xticklabels([s for s, _ in plot], rotation=35, ha='right', fontsize=8)
        ax.set_ylabel('fraction of same-run copy bandwidth')
        ax.set_title('instnorm and peers, %s' % ctx.get('gpu', ''))
        ax.legend(fontsize=8, ncol=3)
        fig.tight_layout()
        fig.savefig(a.out_png, dpi=110)


if __name__ == '__main__':
    main()
