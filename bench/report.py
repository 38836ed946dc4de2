#!/usr/bin/env python3
"""Turns one device run into BENCHMARKS.md's table and plot.

    python3 bench/report.py --bench bench.json [--bench2 bench2.json] --peers peers.json \
        --commit $(git rev-parse --short HEAD) --out-md table.md --out-png docs/benchmarks.png

bench.json is instnorm_bench's --benchmark_out (JSON); peers.json comes from
../shared/peers/peers.py run in the same device call. With --bench2 (a second, back-to-back bench
run) the table gains the run-to-run difference of instnorm's time per row.
"""
import argparse
import json


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--bench', required=True)
    ap.add_argument('--bench2')
    ap.add_argument('--peers')
    ap.add_argument('--commit', default='?')
    ap.add_argument('--date', default='?')
    ap.add_argument('--driver', default='?')
    ap.add_argument('--out-md', required=True)
    ap.add_argument('--out-png')
    a = ap.parse_args()

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
    lines.append('GPU: %s, driver %s, commit %s, date %s. Times are medians in ms with the L2 '
                 'flushed before every run; `of copy` = same-run device-to-device copy time / '
                 'instnorm time (1.0 = the floor of one read and one write).' %
                 (ctx.get('gpu', '?'), a.driver, a.commit, a.date))
    lines.append('')
    head = ['shape', 'instnorm ms', 'GB/s', 'of copy', 'copy ms', 'naive ms', 'cuDNN ms',
            'PyTorch eager ms', 'torch.compile ms', 'Triton start ms', 'plan']
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
        copy = ms(row, 'copy')
        frac = row['instnorm'].get('of_copy')
        cells = [shape, fmt(t), '%.0f' % row['instnorm']['GBps'], fmt(frac, 3), fmt(copy),
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
                if ms(row, kind):
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
