#!/usr/bin/env bash
# Whether a change to the headers changed any kernel's machine code: compiles every kernel
# instantiation (tests/header_check_instantiate.cu) for one architecture from two include trees
# and compares each kernel's SASS (its .text section of the cubin) byte for byte. A refactor that
# leaves every kernel identical needs no device run to keep speed, spills and results; one that
# does not is a codegen change (e.g. a reordered parameter struct: spills on the device).
# Usage: tests/same_code.sh <include dir A> <include dir B> [sm_90 [sm_89 ...]]
#   e.g. git worktree add /tmp/base HEAD && tests/same_code.sh /tmp/base/include include
# Exits 0 when every kernel is identical on every architecture, 1 otherwise.
set -euo pipefail
a=$1 b=$2
shift 2
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(sm_90)
here=$(cd "$(dirname "$0")" && pwd)
nvcc=${NVCC:-nvcc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
for arch in "${archs[@]}"; do
  for side in a b; do
    inc=$a
    [ "$side" = b ] && inc=$b
    "$nvcc" -std=c++17 --expt-relaxed-constexpr -I"$inc" -arch="$arch" -cubin \
      "$here/header_check_instantiate.cu" -o "$tmp/$side.$arch.cubin" &
  done
  wait
  python3 - "$tmp/a.$arch.cubin" "$tmp/b.$arch.cubin" "$arch" << 'PY' || rc=1
import hashlib, struct, sys

def kernels(path):
    """name -> sha1 of the .text.<name> section of an ELF64 cubin."""
    d = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", d, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    sec = lambda i: struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize)
    names = sec(shstrndx)[4]
    out = {}
    for i in range(shnum):
        h = sec(i)
        n = d[names + h[0]:d.index(b"\0", names + h[0])].decode()
        if n.startswith(".text."):
            out[n[6:]] = hashlib.sha1(d[h[4]:h[4] + h[5]]).hexdigest()
    return out

a, b = kernels(sys.argv[1]), kernels(sys.argv[2])
diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
print(f"{sys.argv[3]}: {len(a)} kernels in A, {len(b)} in B, {len(diff)} differ")
for k in diff:
    print("  differs:", k)
sys.exit(1 if diff or not a else 0)
PY
done
exit $rc
