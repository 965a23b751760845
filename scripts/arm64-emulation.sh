#!/usr/bin/env bash
# The board quick-start (docs/board.md) on an emulated RK3588 user space, from this checkout:
#   an arm64 Debian bookworm root (debootstrap + qemu-user-static, both Debian packages), its CPU modelled as the
#   RK3588's Cortex-A76 (QEMU_CPU=cortex-a76: no i8mm, like the board), `pip install -e '.[board]'` in it, then
#   1. `generate --backend onnx` on smollm2-135m: greedy token ids at --weights native (the default: exo-rknpu's
#      own kernel, built in the root by its gcc on first use), fp32 and auto must equal x86's, on the bundled Q4_1
#      file and (native, auto) on the same model re-encoded as Q8_0 (split8 in every layer under auto); int4 is
#      compared and reported (docs/board.md "Answers across CPUs"); native's logits on the prompt + those ids must
#      equal x86's bit for bit (docs/perf/logits_digest.py, which also names the kernel path the root built); then
#      the onnxruntime kernels behind each form are compared bit for bit (docs/perf/isa_ops.py);
#   2. the npu path: slices compiled on x86 are copied in, `doctor` runs RKNNLite's init_runtime on one of them and
#      must report its failure (no NPU here) in one line, and `generate --backend npu` must refuse in one line;
#   3. `--emulate` runs the same npu plan on the CPU and says so.
# Needs root (debootstrap, chroot, mounts) and network (Debian mirror, PyPI). Reuses the root when it exists:
# ARM64_ROOT (default /work/arm64/root; another branch may share it). X86_PY: the x86 python with exo-rknpu and
# the toolkit (`exo-rknpu toolkit install`) — default .venv/bin/python of this checkout.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ARM64_ROOT:-/work/arm64/root}
WORK=$(dirname "$ROOT")  # scratch beside the root (the slices compiled on x86)
X86_PY=${X86_PY:-$REPO/.venv/bin/python}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PROMPT="The capital of France is"
TOKENS=${TOKENS:-16}
START=$(date +%s)
say() { echo "[arm64-emulation +$(( $(date +%s) - START ))s] $*"; }
fail() { echo "[arm64-emulation] FAIL: $*" >&2; exit 1; }
x86() { PYTHONPATH="$REPO" "$X86_PY" -m exo_rknpu.cli.main "$@"; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, chroot and mounts need it)"
[ -x "$X86_PY" ] || fail "no x86 python at $X86_PY (set X86_PY)"

# ---- host tools and binfmt: arm64 binaries run through qemu-aarch64-static
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null || ! command -v update-binfmts >/dev/null; then
  say "apt-get install debootstrap qemu-user-static binfmt-support"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap qemu-user-static binfmt-support >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || fail "qemu-aarch64 binfmt lacks the F flag (chroot needs it)"

# ---- the root (once): Debian's python3 (3.11 on bookworm), venv and pip; gcc and libc6-dev for the native kernel
# (--weights native, the default, is compiled on first use by the system C compiler: docs/native.md)
if [ ! -e "$ROOT/.exo-rknpu-root" ]; then
  say "debootstrap arm64 bookworm into $ROOT (several minutes under qemu)"
  rm -rf "$ROOT" && mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1,gcc,libc6-dev \
    bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 || fail "debootstrap failed, see $ROOT.debootstrap.log"
  touch "$ROOT/.exo-rknpu-root"
fi

# ---- mounts for this run: /proc with an RK3588-shaped cpuinfo over it (qemu 7.2 passes the host's x86 cpuinfo
# through and onnxruntime's cpuinfo parser crashes on it), /dev, /sys; the host's CA bundle for pip.
MOUNTS=()
cleanup() { for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
mnt() { mount "$@" && MOUNTS+=("${@: -1}"); }
mnt -t proc proc "$ROOT/proc"
mnt -t sysfs sys "$ROOT/sys"
mnt --bind /dev "$ROOT/dev"
CPUINFO="$ROOT/etc/exo-rknpu-cpuinfo"
: >"$CPUINFO"
for cpu in 0 1 2 3 4 5 6 7; do  # RK3588: 4 x Cortex-A55 (0xd05) + 4 x Cortex-A76 (0xd0b), ARMv8.2 features
  part=$([ $cpu -lt 4 ] && echo 0xd05 || echo 0xd0b)
  printf 'processor\t: %d\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x%d\nCPU part\t: %s\nCPU revision\t: 0\n\n' \
    "$cpu" "$([ $cpu -lt 4 ] && echo 2 || echo 4)" "$part" >>"$CPUINFO"
done
mnt --bind "$CPUINFO" "$ROOT/proc/cpuinfo"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca.crt"  # the host's (possibly proxied) CA roots

# ---- this checkout as a board user's ~/exo-rknpu (tracked files as they are in the work tree)
say "copying the checkout to ~/exo-rknpu in the root"
rm -rf "$ROOT/root/exo-rknpu" && mkdir -p "$ROOT/root/exo-rknpu"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) | tar -C "$ROOT/root/exo-rknpu" -xf -
arm() {  # run a shell command as root's login in the root, on a Cortex-A76
  chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/root/venv/bin:/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    QEMU_CPU=cortex-a76 PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    /bin/bash -c "$1"
}
# a root made before the native kernel needed a compiler: add it (docs/board.md step 2 names the same packages)
if ! arm 'command -v gcc >/dev/null && [ -e /usr/include/stdio.h ]'; then
  say "apt-get install gcc libc6-dev in the root (the native kernel's compiler; a few minutes under qemu)"
  arm 'apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev >/dev/null' \
    || fail "apt-get install gcc libc6-dev failed in the root"
fi
arm 'python3 -c "import platform, sys; assert platform.machine() == \"aarch64\" and sys.version_info[:2] == (3, 11), (platform.machine(), sys.version)"' \
  || fail "the root's python is not aarch64 Python 3.11"

# ---- install: the exact commands of docs/board.md (the venv is kept between runs; -e picks up the new checkout)
T0=$(date +%s)
say "pip install -e '.[board]' (docs/board.md, step 2)"
arm 'cd ~ && { [ -x venv/bin/python ] || python3 -m venv ~/venv; } && . ~/venv/bin/activate && cd ~/exo-rknpu && pip install -q -e ".[board]"' \
  || fail "pip install -e '.[board]' failed"
INSTALL_S=$(( $(date +%s) - T0 ))
arm 'exo-rknpu --help >/dev/null && python -c "import rknnlite.api, onnxruntime; from importlib.metadata import version; print(\"rknn-toolkit-lite2\", version(\"rknn-toolkit-lite2\"), \"onnxruntime\", onnxruntime.__version__)"' \
  || fail "exo-rknpu or rknnlite does not import on aarch64"

# ---- the model: the x86 side fetches the bundled alias once; the root gets the same file
GGUF=$(PYTHONPATH="$REPO" "$X86_PY" -c 'from exo_rknpu.model.zoo import resolve_model; print(resolve_model("smollm2-135m").path)')
mkdir -p "$ROOT/root/models" && cp -u "$GGUF" "$ROOT/root/models/"
AGGUF=/root/models/$(basename "$GGUF")

# ---- 1. same greedy tokens on x86 and on the emulated Cortex-A76
ids() { "$X86_PY" -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["token_ids"])'; }
declare -A RESULT IDS
for w in ${WEIGHTS:-native fp32 auto int4}; do  # WEIGHTS: the forms to compare (default all four)
  T0=$(date +%s)
  want=$(x86 generate --model "$GGUF" --prompt "$PROMPT" --max-tokens "$TOKENS" --weights $w --json 2>/dev/null | ids)
  got=$(arm "exo-rknpu generate --model $AGGUF --prompt '$PROMPT' --max-tokens $TOKENS --weights $w --json 2>/dev/null" | ids)
  say "--weights $w  x86: $want"
  say "--weights $w  a76: $got  ($(( $(date +%s) - T0 )) s)"
  RESULT[$w]=$([ "$want" = "$got" ] && echo same || echo different)
  IDS[$w]=$want
done
# native (one float order on every CPU), fp32 and auto (float32 activations) are the forms whose greedy answers the
# docs say do not depend on the CPU: a difference fails the run. int4 (int8 activations inside MatMulNBits,
# different kernels per instruction set) is printed as evidence for docs/board.md, not a pass/fail condition.
[ "${RESULT[native]:-same}" = same ] || fail "--weights native (the default): aarch64 tokens differ from x86"
[ "${RESULT[fp32]:-same}" = same ] || fail "--weights fp32: aarch64 tokens differ from x86"
[ "${RESULT[auto]:-same}" = same ] || fail "--weights auto: aarch64 tokens differ from x86"

# ---- 1b. native and auto on a source whose every linear is 8-bit: smollm2 re-encoded as Q8_0 by gguf-py (docs/perf/
# requant_gguf.py): native's Q8_0 kernel, and auto's split8 (8-bit blocks as 4-bit blocks over K doubled), run in
# every layer, not only the head
if [ "${SPLIT8:-1}" = 1 ]; then
  Q8="$WORK/$(basename "$GGUF" .gguf).requant-Q8_0.gguf"
  [ -s "$Q8" ] || PYTHONPATH="$REPO" "$X86_PY" "$REPO/docs/perf/requant_gguf.py" "$GGUF" "$Q8" Q8_0 \
    || fail "could not re-encode $GGUF as Q8_0"
  cp -u "$Q8" "$ROOT/root/models/"
  for w in native auto; do
    T0=$(date +%s)
    want=$(x86 generate --model "$Q8" --prompt "$PROMPT" --max-tokens "$TOKENS" --weights $w --json 2>/dev/null | ids)
    got=$(arm "exo-rknpu generate --model /root/models/$(basename "$Q8") --prompt '$PROMPT' --max-tokens $TOKENS --weights $w --json 2>/dev/null" | ids)
    say "Q8_0 --weights $w  x86: $want"
    say "Q8_0 --weights $w  a76: $got  ($(( $(date +%s) - T0 )) s)"
    RESULT[q8$w]=$([ "$want" = "$got" ] && echo same || echo different)
    IDS[q8$w]=$want
    [ "${RESULT[q8$w]}" = same ] || fail "Q8_0 --weights $w: aarch64 tokens differ from x86"
  done
fi

# ---- 1c. native promises the same bits on every CPU for its matmuls; the rest of the graph (attention, norms,
# softmax) is onnxruntime's per-ISA kernels. The logits of the prompt + x86's greedy ids, one prefill at --weights
# native (docs/perf/logits_digest.py: sha256 digests, the kernel path the build took), compared bit for bit: printed
# with the largest difference, not a pass/fail condition (the greedy ids above are)
digest() {  # $1 model path on x86, $2 the same in the root, $3 ids; prints both digests, sets LOGITS to the verdict
  local ids want got
  ids=$(echo "$3" | tr -d '[] ')
  want=$(PYTHONPATH="$REPO" "$X86_PY" "$REPO/docs/perf/logits_digest.py" "$1" "$PROMPT" "$ids" native native "$WORK/logits-x86.npy" 2>/dev/null | tail -1)
  got=$(arm "cd ~/exo-rknpu && python docs/perf/logits_digest.py $2 '$PROMPT' '$ids' native native /root/logits-a76.npy 2>/dev/null" | tail -1)
  say "native logits $(basename "$1")  x86: $want"
  say "native logits $(basename "$1")  a76: $got"
  [ -n "$want" ] && [ -n "$got" ] || return 1
  KERNEL=${got%%;*}; KERNEL=${KERNEL#isa }
  LOGITS=$("$X86_PY" -c 'import sys, numpy as np; a, b = np.load(sys.argv[1]), np.load(sys.argv[2]); d = float(np.max(np.abs(a - b)))
arg = "same" if (a.argmax(-1) == b.argmax(-1)).all() else "different"
print("same bits" if a.tobytes() == b.tobytes() else f"differ by {d:.2e} ({d / float(np.ptp(a)):.1e} of the range), argmax {arg}")' \
    "$WORK/logits-x86.npy" "$ROOT/root/logits-a76.npy")
}
if [ -n "${IDS[native]:-}" ]; then
  T0=$(date +%s)
  digest "$GGUF" "$AGGUF" "${IDS[native]}" || fail "logits_digest.py failed (Q4_1)"
  RESULT[logits]="Q4_1 $LOGITS"
  if [ -n "${IDS[q8native]:-}" ]; then
    digest "$Q8" "/root/models/$(basename "$Q8")" "${IDS[q8native]}" || fail "logits_digest.py failed (Q8_0)"
    RESULT[logits]+=", Q8_0 $LOGITS"
  fi
  RESULT[logits]+=" (kernel $KERNEL)"
  say "native logits x86 vs a76: ${RESULT[logits]} ($(( $(date +%s) - T0 )) s)"
fi

# ---- 1d. the onnxruntime kernels themselves, bit for bit: each op behind each form on fixed inputs (docs/perf/isa_ops.py);
# evidence for docs/design.md#weights, not a pass/fail condition (float32 kernels may sum in another order)
PYTHONPATH="$REPO" "$X86_PY" "$REPO/docs/perf/isa_ops.py" run "$WORK/ops-x86.npz" || fail "isa_ops.py failed on x86"
arm 'cd ~/exo-rknpu && python docs/perf/isa_ops.py run /root/ops-a76.npz' || fail "isa_ops.py failed on aarch64"
say "kernels, x86 vs Cortex-A76 (docs/perf/isa_ops.py):"
PYTHONPATH="$REPO" "$X86_PY" "$REPO/docs/perf/isa_ops.py" compare "$WORK/ops-x86.npz" "$ROOT/root/ops-a76.npz" | sed 's/^/    /'

# ---- 2. the npu path up to RKNNLite's init_runtime: slices compiled on x86, copied as docs/board.md step 3 says
say "compiling layer 29 + head of smollm2 on x86 (one bucket) and copying the compiled cache"
x86 compile --model "$GGUF" --layers 29-29 --seq 1 --context 256 --cache "$WORK/x86-compiled" >"$WORK/compile.log" 2>&1 \
  || fail "compile on x86 failed (is the toolkit installed? exo-rknpu toolkit install); see $WORK/compile.log"
rm -rf "$ROOT/root/.cache/exo-rknpu/compiled" && mkdir -p "$ROOT/root/.cache/exo-rknpu"
cp -r "$WORK/x86-compiled" "$ROOT/root/.cache/exo-rknpu/compiled"
doctor=$(arm 'exo-rknpu doctor' 2>&1) && fail "doctor exited 0 where the NPU cannot run:"$'\n'"$doctor"
echo "$doctor"
# RKNNLite's own refusal without an RK35xx device tree, as doctor must report it (one line, from the child process)
echo "$doctor" | grep -q '^probe .*layers.29.rknn: init_runtime failed: Exception: Please specify the target in init_runtime!$' \
  || fail "doctor did not report init_runtime's failure on the compiled slice in one line"
echo "$doctor" | grep -q '^npu backend *unavailable' || fail "doctor did not say the npu backend is unavailable"
out=$(arm "exo-rknpu generate --model $AGGUF --backend npu --prompt '$PROMPT' --max-tokens 2" 2>&1) \
  && fail "generate --backend npu exited 0 without an NPU"
echo "$out"
[ "$(echo "$out" | grep -c .)" = 1 ] && ! echo "$out" | grep -q Traceback || fail "generate --backend npu: not a one-line error"

# ---- 3. --emulate: the same placement runs on the CPU when asked, and says so
out=$(arm "exo-rknpu generate --model $AGGUF --placement '0-29=npu' --emulate --prompt '$PROMPT' --max-tokens 2 --weights fp32 --json" 2>&1) \
  || fail "--emulate failed: $out"
echo "$out" | tail -1 | grep -q '"emulated": true' || fail "--emulate run did not say emulated"

say "PASS: install ${INSTALL_S}s; tokens default (native) ${RESULT[native]:-not run}, fp32 ${RESULT[fp32]:-not run}, auto ${RESULT[auto]:-not run}, int4 ${RESULT[int4]:-not run}, Q8_0 at native ${RESULT[q8native]:-not run}, Q8_0 at auto (split8) ${RESULT[q8auto]:-not run}; native logits ${RESULT[logits]:-not run}; npu path refused in one line; $(( $(date +%s) - START )) s in all"
