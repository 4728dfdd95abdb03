#!/usr/bin/env bash
# Builds the Anyway appliance images (docs/IMAGES.md):
#
#   build/images/rootfs/                   the Debian root file system (product in /opt/anyway/venv)
#   build/images/anyway-worker-amd64.img   raw bootable disk image (BIOS + UEFI) [+ .bmap]
#   build/images/oci/, anyway-oci.tar      OCI image layout / archive: runs "anyway worker" (or "head ...")
#   build/images/inputs.txt                the pinned inputs this build used
#   build/images/packages.lock, python.lock   every Debian package / Python wheel in the image
#   build/images/SHA256SUMS                checksums of the outputs
#
# Usage: images/build.sh [build|deps [--test]|clean]      (as root; make image runs "build")
#
# Environment (defaults in images/inputs.env):
#   IMAGE_OUT         output folder (build/images)
#   IMAGE_CACHE       cache for the Debian packages, base root fs and wheels (~/.cache/anyway/images)
#   IMAGE_WHEELHOUSE  folder with ready wheels to prefer (e.g. a llama_cpp_python wheel): no compiling
#   IMAGE_CPU         v3 (default, AVX2) or baseline (any x86-64) for the llama.cpp build
#   IMAGE_TARGETS     what to make from the root fs: "disk oci" (default), "disk", "oci" or ""
#   IMAGE_MIRROR      Debian mirror (e.g. a snapshot.debian.org URL for bit-for-bit rebuilds)
#   IMAGE_EXTRA_PACKAGES, IMAGE_COMPONENTS   e.g. "firmware-realtek" and "main,non-free-firmware"
#   IMAGE_NO_APT=1    do not apt-get install missing build tools on this machine
set -euo pipefail
umask 022

IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$IMAGES_DIR")"
# shellcheck source=inputs.env
. "$IMAGES_DIR/inputs.env"
IMAGE_EXTRA_PACKAGES="${IMAGE_EXTRA_PACKAGES:-}"
IMAGE_COMPONENTS="${IMAGE_COMPONENTS:-main}"
OUT="$(realpath -m "${IMAGE_OUT:-$REPO/build/images}")"
CACHE="$(realpath -m "${IMAGE_CACHE:-$HOME/.cache/anyway/images}")"
TARGETS="${IMAGE_TARGETS-disk oci}"
WORK="$OUT/work"
ROOTFS="$OUT/rootfs"
DISK="$OUT/anyway-worker-${IMAGE_ARCH}.img"
export SOURCE_DATE_EPOCH LC_ALL=C.UTF-8 TZ=UTC PYTHONHASHSEED=0 DEBIAN_FRONTEND=noninteractive
T0=$(date +%s)

log() { printf '[image %s +%4ss] %s\n' "$(date -u +%H:%M:%S)" "$(($(date +%s) - T0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
sha() { sha256sum "$@" | cut -d' ' -f1; }
key_of() { printf '%s' "$*" | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- mounts (never rm across one)
mounts_under() { awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r; }
umount_under() {
  local m
  for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
}
safe_rm() {
  local d
  for d in "$@"; do
    [ -e "$d" ] || continue
    umount_under "$d"
    [ -z "$(mounts_under "$d")" ] || die "refusing to delete $d: something is still mounted under it"
    rm -rf --one-file-system "$d"
  done
}
CLEANUP_DIRS=()
BG_PIDS=()
kill_tree() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$c"; done
  kill "$1" 2>/dev/null || true
}
cleanup() {
  local d p
  for p in "${BG_PIDS[@]}"; do kill_tree "$p"; done
  for d in "${CLEANUP_DIRS[@]}"; do umount_under "$d"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Commands in the root fs get a clean environment (no PIP_*, PYTHON* or locale from this machine).
ch() {
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 TZ=UTC \
    SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" PYTHONHASHSEED=0 DEBIAN_FRONTEND=noninteractive chroot "$@"
}
chroot_mount() {
  local r="$1"
  CLEANUP_DIRS+=("$r")
  mount -t proc proc "$r/proc"
  mount -t sysfs sysfs "$r/sys"
  mount --bind /dev "$r/dev"
}

# ---------------------------------------------------------------- build tools on this machine
HOST_TOOLS=(debootstrap:debootstrap mkfs.ext4:e2fsprogs mkfs.vfat:dosfstools mcopy:mtools
  syslinux:syslinux /usr/lib/syslinux/mbr/mbr.bin:syslinux-common sfdisk:fdisk bmaptool:bmap-tools
  gpgv:gpgv)
TEST_TOOLS=(qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils skopeo:skopeo)
host_deps() {
  local missing=() item cmd pkg
  for item in "$@"; do
    cmd="${item%%:*}" pkg="${item##*:}"
    if [[ "$cmd" == /* ]]; then [ -e "$cmd" ] || missing+=("$pkg"); else command -v "$cmd" >/dev/null || missing+=("$pkg"); fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "${IMAGE_NO_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
    die "missing build tools; install them: apt-get install --no-install-recommends ${missing[*]}"
  fi
  log "installing build tools: ${missing[*]}"
  apt-get update -qq >/dev/null 2>&1 || apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
pkgver() { dpkg-query -W -f '${Version}' "$1" 2>/dev/null || echo "?"; }

# ---------------------------------------------------------------- python on this machine
host_python() {
  # A Python 3.11 with pip, setuptools and wheel: the repo's .venv (make setup), else our own.
  if [ -n "${IMAGE_PYTHON:-}" ]; then echo "$IMAGE_PYTHON"; return; fi
  if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c 'import setuptools, wheel' 2>/dev/null; then
    echo "$REPO/.venv/bin/python"; return
  fi
  local v="$CACHE/buildvenv"
  if ! [ -x "$v/bin/python" ]; then
    python3 -m venv "$v"
    "$v/bin/python" -m pip -q --disable-pip-version-check install "pip>=24" "setuptools>=68" wheel
  fi
  echo "$v/bin/python"
}

# ---------------------------------------------------------------- stage 1: Debian packages
DEB_PACKAGES="$(echo $IMAGE_PACKAGES $IMAGE_EXTRA_PACKAGES)"
DEBS_KEY="$(key_of "$IMAGE_SUITE $IMAGE_MIRROR $IMAGE_ARCH $IMAGE_VARIANT $IMAGE_COMPONENTS $DEB_PACKAGES $(pkgver debootstrap)")"
DEBS_TGZ="$CACHE/debootstrap/debs-$IMAGE_SUITE-$IMAGE_ARCH-$DEBS_KEY.tgz"
BASE_KEY="$(key_of "$DEBS_KEY $SOURCE_DATE_EPOCH base-v1")"
BASE="$CACHE/base/base-$BASE_KEY"
debootstrap_args() {
  echo --variant="$IMAGE_VARIANT" --arch="$IMAGE_ARCH" --components="$IMAGE_COMPONENTS" \
    --include="$(echo "$DEB_PACKAGES" | tr ' ' ',')"
}
stage_debs() {
  if [ -s "$DEBS_TGZ" ]; then log "Debian packages: cached $(basename "$DEBS_TGZ")"; return; fi
  log "Debian packages: downloading $IMAGE_SUITE ($IMAGE_VARIANT + ${DEB_PACKAGES// /,}) from $IMAGE_MIRROR"
  mkdir -p "$(dirname "$DEBS_TGZ")"
  local tmp="$CACHE/debootstrap/tmp-$DEBS_KEY"
  safe_rm "$tmp"
  # shellcheck disable=SC2046
  debootstrap $(debootstrap_args) --make-tarball="$DEBS_TGZ.part" "$IMAGE_SUITE" "$tmp" "$IMAGE_MIRROR" \
    >"$CACHE/debootstrap/debs-$DEBS_KEY.log" 2>&1 || { tail -20 "$CACHE/debootstrap/debs-$DEBS_KEY.log" >&2; die "debootstrap --make-tarball failed"; }
  safe_rm "$tmp"
  mv "$DEBS_TGZ.part" "$DEBS_TGZ"
}

# ---------------------------------------------------------------- stage 2: base root fs (unpacked)
stage_base() {
  if [ -f "$BASE.ok" ] && [ -d "$BASE" ]; then log "base root fs: cached $(basename "$BASE")"; return; fi
  log "base root fs: installing the packages (debootstrap --unpack-tarball)"
  mkdir -p "$CACHE/base"
  local tmp="$BASE.tmp"
  safe_rm "$tmp" "$BASE"
  CLEANUP_DIRS+=("$tmp")
  # shellcheck disable=SC2046
  debootstrap $(debootstrap_args) --unpack-tarball="$DEBS_TGZ" "$IMAGE_SUITE" "$tmp" "$IMAGE_MIRROR" \
    >"$BASE.log" 2>&1 || { tail -20 "$BASE.log" >&2; die "debootstrap --unpack-tarball failed (log: $BASE.log)"; }
  umount_under "$tmp"
  mv "$tmp" "$BASE"
  touch "$BASE.ok"
  # keep only this base (each is ~900 MB)
  local old
  for old in "$CACHE"/base/base-*; do
    case "$old" in "$BASE" | "$BASE".*) ;; *) safe_rm "$old" ;; esac
  done
}

# ---------------------------------------------------------------- stage 3: wheels
LLAMA_KEY="$(key_of "$IMAGE_LLAMA_VERSION $IMAGE_LLAMA_CMAKE_ARGS")"
LLAMA_DIR="$CACHE/wheels/llama-cpp-python-$IMAGE_LLAMA_VERSION-$(uname -m)-$LLAMA_KEY"
find_llama_wheel() {
  local w=""
  if [ -n "${IMAGE_WHEELHOUSE:-}" ]; then
    w="$(ls "$IMAGE_WHEELHOUSE"/llama_cpp_python-"$IMAGE_LLAMA_VERSION"-*.whl \
      "$IMAGE_WHEELHOUSE"/*/llama_cpp_python-"$IMAGE_LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  fi
  [ -n "$w" ] || w="$(ls "$LLAMA_DIR"/llama_cpp_python-"$IMAGE_LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  echo "$w"
}
llama_src() {
  case "$1" in
    "$LLAMA_DIR"/*) echo "built here from the PyPI sdist with CMAKE_ARGS=\"$IMAGE_LLAMA_CMAKE_ARGS\" (cached)" ;;
    *) echo "from IMAGE_WHEELHOUSE $(dirname "$1") (built elsewhere: its CMAKE_ARGS must match IMAGE_CPU)" ;;
  esac
}
build_llama_wheel() {
  # Runs in the background while debootstrap works. Portable: no -march=native.
  local py="$1" tmp="$LLAMA_DIR.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  CMAKE_ARGS="$IMAGE_LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$py" -m pip --disable-pip-version-check wheel --no-deps --no-cache-dir -w "$tmp" \
    "llama-cpp-python==$IMAGE_LLAMA_VERSION"
  local w
  w="$(ls "$tmp"/llama_cpp_python-*.whl)"
  "$py" - "$w" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert any(n.endswith("lib/libggml-rpc.so") for n in names), "wheel lacks libggml-rpc.so: built without -DGGML_RPC=ON"
PY
  rm -rf "$LLAMA_DIR" && mv "$tmp" "$LLAMA_DIR"
}
DEPS_DIR=""
stage_dep_wheels() {
  # Every dependency of the product and of llama-cpp-python, exactly as the hash-pinned lock says
  # (ansible/roles/anyway_common/files/requirements.lock, made by pip-compile: make lock).
  local py="$1" lock="$REPO/ansible/roles/anyway_common/files/requirements.lock"
  DEPS_DIR="$CACHE/wheels/deps-$(key_of "$(sha "$lock") $("$py" -c 'import sys,sysconfig;print(sys.version_info[:2],sysconfig.get_platform())')")"
  if [ -f "$DEPS_DIR/.ok" ]; then log "python wheels: cached $(basename "$DEPS_DIR")"; return; fi
  log "python wheels: downloading the locked dependencies (hashes checked)"
  rm -rf "$DEPS_DIR.tmp" && mkdir -p "$DEPS_DIR.tmp"
  "$py" "$REPO/ansible/roles/anyway_common/files/anyway_lock.py" "$lock" "$DEPS_DIR.tmp" "$IMAGE_LLAMA_VERSION" >/dev/null \
    || die "the lock does not fit llama-cpp-python $IMAGE_LLAMA_VERSION: run make lock"
  local extra=()
  [ -n "${IMAGE_WHEELHOUSE:-}" ] && extra=(--find-links "$IMAGE_WHEELHOUSE")
  "$py" -m pip --disable-pip-version-check wheel --require-hashes --no-deps "${extra[@]}" -w "$DEPS_DIR.tmp" \
    -r "$DEPS_DIR.tmp/deps.txt" >"$DEPS_DIR.log" 2>&1 || { tail -20 "$DEPS_DIR.log" >&2; die "downloading the Python dependencies failed"; }
  rm -f "$DEPS_DIR.tmp/llama.txt"
  touch "$DEPS_DIR.tmp/.ok"
  rm -rf "$DEPS_DIR" && mv "$DEPS_DIR.tmp" "$DEPS_DIR"
}
stage_product_wheel() {
  local py="$1" src="$WORK/src"
  rm -rf "$src" "$WORK/wheels" && mkdir -p "$src" "$WORK/wheels"
  # The tracked and untracked-but-not-ignored sources of the package, nothing else.
  if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -co --exclude-standard -- pyproject.toml README.md appliance tui |
      while read -r f; do [ -f "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -C "$src" -xf -
  else
    (cd "$REPO" && tar --exclude=__pycache__ -cf - pyproject.toml README.md appliance tui) | tar -C "$src" -xf -
  fi
  "$py" -m pip --disable-pip-version-check wheel --no-deps --no-build-isolation -w "$WORK/wheels" "$src" \
    >"$WORK/product-wheel.log" 2>&1 || { tail -20 "$WORK/product-wheel.log" >&2; die "building the product's wheel failed"; }
  rm -rf "$src"
}

# ---------------------------------------------------------------- stage 4: the product root fs
ANYWAY_VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n1)"
GIT_REV="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
rootfs_inputs_hash() {
  {
    echo "$BASE_KEY $GIT_REV $IMAGE_CPU_FLAGS $IMAGE_UID $IMAGE_ROOT_UUID $IMAGE_BOOT_VOLID $IMAGE_DEBIAN_VERSION"
    sha "$IMAGES_DIR/build.sh" "$IMAGES_DIR/inputs.env"
    (cd "$IMAGES_DIR" && find overlay firstboot -type f ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum)
    sha "$@"
  } | sha256sum | cut -c1-16
}
write_file() { mkdir -p "$(dirname "$1")"; cat >"$1"; chmod "${2:-644}" "$1"; }
configure_rootfs() {
  local r="$1"
  shift
  local wheels=("$@")
  chroot_mount "$r"
  # our files
  tar -C "$IMAGES_DIR/overlay" --owner=0 --group=0 --numeric-owner -cf - . | tar -C "$r" -xpf -
  install -D -m 644 "$IMAGES_DIR/firstboot/anyway_firstboot.py" "$r/usr/local/lib/anyway-image/anyway_firstboot.py"
  mkdir -p "$r/boot/anyway" "$r/etc/issue.d"
  write_file "$r/etc/fstab" <<EOF
# Anyway appliance image
UUID=$IMAGE_ROOT_UUID  /             ext4  errors=remount-ro  0 1
UUID=${IMAGE_BOOT_VOLID:0:4}-${IMAGE_BOOT_VOLID:4:4}  /boot/anyway  vfat  umask=0077,shortname=mixed,nofail,x-systemd.device-timeout=15s  0 2
EOF
  echo anyway-worker >"$r/etc/hostname"
  write_file "$r/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	anyway-worker
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
  rm -f "$r/etc/apt/sources.list"
  write_file "$r/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $IMAGE_MIRROR
Suites: $IMAGE_SUITE $IMAGE_SUITE-updates
Components: ${IMAGE_COMPONENTS//,/ }
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $IMAGE_SECURITY_MIRROR
Suites: $IMAGE_SUITE-security
Components: ${IMAGE_COMPONENTS//,/ }
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  echo 'LANG=C.UTF-8' >"$r/etc/default/locale"
  ln -sf /usr/share/zoneinfo/Etc/UTC "$r/etc/localtime"
  echo Etc/UTC >"$r/etc/timezone"
  write_file "$r/etc/anyway/image-release" <<EOF
# Anyway appliance image (images/build.sh)
ANYWAY_VERSION=$ANYWAY_VERSION
SOURCE_REVISION=$GIT_REV
DEBIAN="$IMAGE_SUITE $(cat "$r/etc/debian_version")"
LLAMA_CPP_PYTHON=$IMAGE_LLAMA_VERSION
CPU_TARGET="$IMAGE_CPU: $IMAGE_LLAMA_CMAKE_ARGS"
REQUIRED_CPU_FLAGS="$IMAGE_CPU_FLAGS"
SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH
EOF
  # the user that runs the worker
  ch "$r" groupadd --system --gid "$IMAGE_UID" anyway
  ch "$r" useradd --system --uid "$IMAGE_UID" --gid "$IMAGE_UID" --home-dir /var/lib/anyway --no-create-home \
    --shell /usr/sbin/nologin --comment "Anyway worker" anyway
  install -d -m 750 -o "$IMAGE_UID" -g "$IMAGE_UID" "$r/var/lib/anyway" "$r/var/lib/anyway/cache"
  install -d -m 750 -o 0 -g "$IMAGE_UID" "$r/etc/anyway/keys"
  # the product, from wheels only (nothing is compiled in the image), every one hash-pinned:
  # the locked dependencies, and the two wheels built here by their sha256
  mkdir -p "$r/tmp/wheels"
  cp "${wheels[@]}" "$r/tmp/wheels/"
  {
    cat "$DEPS_DIR/deps.txt"
    local w
    for w in "${wheels[@]}"; do
      case "$(basename "$w")" in
        anyway-*.whl|llama_cpp_python-*.whl) echo "/tmp/wheels/$(basename "$w") --hash=sha256:$(sha "$w")" ;;
      esac
    done
  } >"$r/tmp/wheels/requirements.txt"
  ch "$r" /usr/bin/python3 -m venv /opt/anyway/venv
  ch "$r" /opt/anyway/venv/bin/python -m pip --disable-pip-version-check -q install --no-index --no-cache-dir \
    --require-hashes --find-links /tmp/wheels -r /tmp/wheels/requirements.txt
  ch "$r" /opt/anyway/venv/bin/python -c 'import appliance, llama_cpp, zmq; assert llama_cpp.llama_supports_rpc(), "no RPC"' \
    || die "the product does not import inside the root fs"
  ln -sf /opt/anyway/venv/bin/anyway "$r/usr/local/bin/anyway"
  rm -rf "$r/tmp/wheels"
  ch "$r" /opt/anyway/venv/bin/python -m pip --disable-pip-version-check list --format=freeze >"$OUT/python.lock.tmp"
  # services
  ch "$r" systemctl enable anyway-firstboot.service anyway-worker.service systemd-networkd.service \
    systemd-resolved.service systemd-timesyncd.service ssh.service >/dev/null 2>&1
  ch "$r" systemctl mask systemd-firstboot.service >/dev/null 2>&1
  ch "$r" systemctl set-default multi-user.target >/dev/null 2>&1
  ch "$r" dpkg-query -W -f '${Package}=${Version}\n' | LC_ALL=C sort >"$OUT/packages.lock.tmp"
  umount_under "$r"
  # per-machine state is made on the first boot, not shipped
  rm -f "$r"/etc/ssh/ssh_host_*
  : >"$r/etc/machine-id"
  rm -f "$r/var/lib/dbus/machine-id"
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old \
    "$r"/var/cache/ldconfig/aux-cache "$r"/root/.cache "$r"/tmp/* "$r"/var/tmp/* "$r"/var/log/journal/*
  mkdir -p "$r/var/lib/apt/lists/partial"
  find "$r/var/log" -type f -exec truncate -s 0 {} +
  # reproducible time stamps
  find "$r" -xdev -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"
}
stage_rootfs() {
  local wheels=("$@") h
  h="$(rootfs_inputs_hash "${wheels[@]}")"
  if [ -d "$ROOTFS" ] && [ "$(cat "$OUT/.rootfs.stamp" 2>/dev/null)" = "$h" ]; then
    log "root fs: up to date ($ROOTFS)"
    return
  fi
  log "root fs: copying the base and installing the product"
  safe_rm "$ROOTFS" "$ROOTFS.tmp"
  rm -f "$OUT/.rootfs.stamp"
  cp -a "$BASE" "$ROOTFS.tmp"
  configure_rootfs "$ROOTFS.tmp" "${wheels[@]}"
  mv "$ROOTFS.tmp" "$ROOTFS"
  mv "$OUT/python.lock.tmp" "$OUT/python.lock"
  mv "$OUT/packages.lock.tmp" "$OUT/packages.lock"
  echo "$h" >"$OUT/.rootfs.stamp"
  log "root fs: $(du -sh --apparent-size "$ROOTFS" | cut -f1) in $ROOTFS"
}

# ---------------------------------------------------------------- stage 5: the disk image
ext4_clamp_times() {
  # mkfs.ext4 -d copies each file's atime and ctime, which are "when this build touched it":
  # set them to SOURCE_DATE_EPOCH in every inode in use (debugfs recomputes the checksums).
  local img="$1" off="$2"
  dumpe2fs "$img?offset=$off" 2>/dev/null | python3 -c '
import re, sys
txt, epoch = sys.stdin.read(), sys.argv[1]
total = int(re.search(r"Inode count:\s+(\d+)", txt).group(1))
used = [True] * (total + 1)
for m in re.finditer(r"Free inodes: ([0-9, -]*)\n", txt):
    for part in filter(None, (p.strip() for p in m.group(1).split(","))):
        a, _, b = part.partition("-")
        for i in range(int(a), int(b or a) + 1):
            used[i] = False
sys.stdout.write("".join(f"sif <{i}> atime @{epoch}\nsif <{i}> ctime @{epoch}\n" for i in range(1, total + 1) if used[i] and (i == 2 or i >= 11)))
' "$SOURCE_DATE_EPOCH" >"$WORK/clamp.debugfs"
  E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" debugfs -w -f "$WORK/clamp.debugfs" "$img?offset=$off" >/dev/null 2>"$WORK/clamp.err" || { cat "$WORK/clamp.err" >&2; die "debugfs failed"; }
}
KERNEL_VERSION=""
stage_disk() {
  local r="$ROOTFS" bp="$WORK/bootpart" fat="$WORK/boot.fat" k
  k="$(ls "$r"/boot/vmlinuz-* | sort -V | tail -n1)"
  KERNEL_VERSION="${k##*/vmlinuz-}"
  log "disk image: kernel $KERNEL_VERSION, boot partition ${IMAGE_BOOT_MIB} MiB (FAT32, SYSLINUX + systemd-boot)"
  rm -rf "$bp" && mkdir -p "$bp/EFI/BOOT"
  cp -r "$IMAGES_DIR/bootpart/." "$bp/"
  sed -i "s/@ROOT_UUID@/$IMAGE_ROOT_UUID/g; s/@DEBIAN_VERSION@/$(cat "$r/etc/debian_version")/g" \
    "$bp/syslinux.cfg" "$bp/loader/entries/anyway.conf"
  cp "$k" "$bp/vmlinuz"
  cp "$r/boot/initrd.img-$KERNEL_VERSION" "$bp/initrd.img"
  cp "$r/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$bp/EFI/BOOT/BOOTX64.EFI"
  find "$bp" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  rm -f "$fat"
  # --invariant: fixed times and serial; then our volume id (fstab mounts it by UUID) into the
  # boot sector and its FAT32 backup (sector 6), little-endian at offset 0x43.
  mkfs.vfat -C -F 32 -n ANYWAY -h 2048 --invariant "$fat" $((IMAGE_BOOT_MIB * 1024)) >/dev/null
  local id="$IMAGE_BOOT_VOLID" sector
  for sector in 0 6; do
    printf "\\x${id:6:2}\\x${id:4:2}\\x${id:2:2}\\x${id:0:2}" |
      dd of="$fat" bs=1 seek=$((sector * 512 + 0x43)) conv=notrunc status=none
  done
  [ "$(blkid -o value -s UUID "$fat")" = "${id:0:4}-${id:4:4}" ] || die "boot partition volume id not set"
  (cd "$bp" && MTOOLS_SKIP_CHECK=1 mcopy -s -m -Q -i "$fat" $(ls -A | LC_ALL=C sort) ::/)
  syslinux --install "$fat"
  # root file system: the image's used size plus room; anyway-firstboot grows it to the disk.
  local used_kib root_mib boot_start=2048 boot_sectors root_start root_sectors total
  used_kib="$(du -sk --apparent-size "$r" | cut -f1)"
  root_mib=$(((used_kib * 13 / 10 / 1024 + 512 + 63) / 64 * 64))
  boot_sectors=$((IMAGE_BOOT_MIB * 2048))
  root_start=$((boot_start + boot_sectors))
  root_sectors=$((root_mib * 2048))
  total=$(((root_start + root_sectors + 2048) * 512))
  rm -f "$DISK" "$DISK.bmap"
  truncate -s "$total" "$DISK"
  sfdisk -q "$DISK" <<EOF
label: dos
label-id: $IMAGE_DISK_ID
unit: sectors

start=$boot_start, size=$boot_sectors, type=c, bootable
start=$root_start, size=$root_sectors, type=83
EOF
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$DISK" bs=440 count=1 conv=notrunc status=none
  dd if="$fat" of="$DISK" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f "$fat"
  log "disk image: root partition ${root_mib} MiB (ext4, from the root fs)"
  E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mkfs.ext4 -q -F -L anyway-root -U "$IMAGE_ROOT_UUID" \
    -E "offset=$((root_start * 512)),hash_seed=$IMAGE_ROOT_UUID,root_owner=0:0" -d "$r" "$DISK" "${root_mib}M"
  ext4_clamp_times "$DISK" $((root_start * 512))
  e2fsck -fn "$DISK?offset=$((root_start * 512))" >"$WORK/e2fsck.log" 2>&1 || { cat "$WORK/e2fsck.log" >&2; die "the root file system does not check clean"; }
  if command -v bmaptool >/dev/null; then bmaptool create -o "$DISK.bmap" "$DISK" 2>/dev/null; fi
  rm -rf "$bp"
  log "disk image: $(basename "$DISK") $((total >> 20)) MiB ($(du -m "$DISK" | cut -f1) MiB allocated)"
}

# ---------------------------------------------------------------- stage 6: the OCI image
stage_oci() {
  local py="$1"
  log "OCI image: one layer (the root fs without kernel and boot files), runs 'anyway worker'"
  safe_rm "$OUT/oci"
  "$py" "$IMAGES_DIR/oci.py" --rootfs "$ROOTFS" --out "$OUT/oci" --archive "$OUT/anyway-oci.tar" \
    --version "$ANYWAY_VERSION" --revision "$GIT_REV" --created "$SOURCE_DATE_EPOCH"
}

# ---------------------------------------------------------------- inputs and checksums
write_inputs() {
  local llama_whl="$1" release
  release="$(cd "$BASE/var/lib/apt/lists" 2>/dev/null && ls ./*_Release 2>/dev/null | head -n1 || true)"
  {
    echo "# Inputs of the Anyway appliance images (images/build.sh, pins in images/inputs.env)"
    echo "anyway              $ANYWAY_VERSION (source $GIT_REV)"
    echo "debian              $IMAGE_SUITE $(cat "$ROOTFS/etc/debian_version"), $IMAGE_ARCH, variant $IMAGE_VARIANT, components $IMAGE_COMPONENTS"
    echo "debian mirror       $IMAGE_MIRROR"
    if [ -n "$release" ]; then
      echo "debian Release      $(sed -n 's/^Date: //p' "$BASE/var/lib/apt/lists/$release" | head -n1) (sha256 $(sha "$BASE/var/lib/apt/lists/$release"))"
    fi
    echo "debian packages     $DEB_PACKAGES"
    echo "                    (with dependencies: $(wc -l <"$OUT/packages.lock") packages, versions in packages.lock)"
    echo "debootstrap         $(pkgver debootstrap), debs tarball sha256 $(sha "$DEBS_TGZ")"
    echo "kernel              $(ls "$ROOTFS"/boot/vmlinuz-* | sed 's/.*vmlinuz-//' | sort -V | tail -n1)"
    echo "python              $(ch "$ROOTFS" /usr/bin/python3 --version 2>&1) (Debian), venv /opt/anyway/venv"
    echo "python wheels       $(wc -l <"$OUT/python.lock") (python.lock); every dependency hash-pinned by requirements.lock (sha256 $(sha "$REPO/ansible/roles/anyway_common/files/requirements.lock"))"
    echo "llama-cpp-python    $IMAGE_LLAMA_VERSION, $(llama_src "$llama_whl")"
    echo "                    wheel sha256 $(sha "$llama_whl")"
    echo "cpu target          $IMAGE_CPU (CMAKE_ARGS \"$IMAGE_LLAMA_CMAKE_ARGS\"; CPU flags required: ${IMAGE_CPU_FLAGS:-none})"
    echo "bootloaders         syslinux $(pkgver syslinux) (BIOS, build host), systemd-boot $(ch "$ROOTFS" dpkg-query -W -f '${Version}' systemd-boot-efi) (UEFI, image)"
    echo "host tools          e2fsprogs $(pkgver e2fsprogs), dosfstools $(pkgver dosfstools), mtools $(pkgver mtools), fdisk $(pkgver fdisk)"
    echo "SOURCE_DATE_EPOCH   $SOURCE_DATE_EPOCH ($(date -u -d "@$SOURCE_DATE_EPOCH" +%F))"
    echo "file systems        root ext4 UUID $IMAGE_ROOT_UUID, boot FAT32 UUID ${IMAGE_BOOT_VOLID:0:4}-${IMAGE_BOOT_VOLID:4:4}, MBR id $IMAGE_DISK_ID"
  } >"$OUT/inputs.txt"
}
write_sums() {
  local files=() f
  for f in "$(basename "$DISK")" "$(basename "$DISK").bmap" anyway-oci.tar inputs.txt packages.lock python.lock; do
    [ -f "$OUT/$f" ] && files+=("$f")
  done
  (cd "$OUT" && sha256sum "${files[@]}" >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
}

# ---------------------------------------------------------------- main
cmd_build() {
  [ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and device files need it): sudo make image"
  [ "$(uname -m)" = x86_64 ] || die "builds for amd64 only run on x86_64"
  host_deps "${HOST_TOOLS[@]}"
  mkdir -p "$OUT" "$CACHE" "$WORK"
  local py llama_whl pid=""
  py="$(host_python)"
  log "inputs: Debian $IMAGE_SUITE from $IMAGE_MIRROR, anyway $ANYWAY_VERSION ($GIT_REV), llama-cpp-python $IMAGE_LLAMA_VERSION (CPU $IMAGE_CPU), SOURCE_DATE_EPOCH $SOURCE_DATE_EPOCH"
  log "cache: $CACHE; output: $OUT"
  llama_whl="$(find_llama_wheel)"
  if [ -z "$llama_whl" ]; then
    log "llama-cpp-python: building $IMAGE_LLAMA_VERSION with CMAKE_ARGS=\"$IMAGE_LLAMA_CMAKE_ARGS\" in the background (5-10 min on 2 cores, cached after)"
    mkdir -p "$CACHE/wheels"
    build_llama_wheel "$py" >"$LLAMA_DIR.log" 2>&1 &
    pid=$!
    BG_PIDS+=("$pid")
  fi
  stage_debs
  stage_base
  stage_product_wheel "$py"
  if [ -n "$pid" ]; then
    log "llama-cpp-python: waiting for the build (log: $LLAMA_DIR.log)"
    wait "$pid" || { tail -30 "$LLAMA_DIR.log" >&2; die "building llama-cpp-python failed"; }
    BG_PIDS=()
    llama_whl="$(find_llama_wheel)"
    log "llama-cpp-python: built $(basename "$llama_whl")"
  else
    log "llama-cpp-python: $(basename "$llama_whl"), $(llama_src "$llama_whl")"
  fi
  [ -n "$llama_whl" ] || die "no llama-cpp-python wheel"
  stage_dep_wheels "$py"
  local wheels=("$DEPS_DIR"/*.whl "$WORK"/wheels/*.whl "$llama_whl")
  stage_rootfs "${wheels[@]}"
  local rootfs_stamp
  rootfs_stamp="$(cat "$OUT/.rootfs.stamp")"
  case " $TARGETS " in *" disk "*)
    local disk_stamp
    disk_stamp="$rootfs_stamp $(cd "$IMAGES_DIR" && find bootpart -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
    if [ -f "$DISK" ] && [ "$(cat "$OUT/.disk.stamp" 2>/dev/null)" = "$disk_stamp" ]; then
      log "disk image: up to date"
    else
      rm -f "$OUT/.disk.stamp"
      stage_disk
      echo "$disk_stamp" >"$OUT/.disk.stamp"
    fi ;;
  esac
  case " $TARGETS " in *" oci "*)
    if [ -f "$OUT/anyway-oci.tar" ] && [ "$(cat "$OUT/.oci.stamp" 2>/dev/null)" = "$rootfs_stamp $(sha "$IMAGES_DIR/oci.py")" ]; then
      log "OCI image: up to date"
    else
      rm -f "$OUT/.oci.stamp"
      stage_oci "$py"
      echo "$rootfs_stamp $(sha "$IMAGES_DIR/oci.py")" >"$OUT/.oci.stamp"
    fi ;;
  esac
  write_inputs "$llama_whl"
  write_sums
  rm -rf "$WORK"
  log "done in $(($(date +%s) - T0)) s; outputs in $OUT:"
  (cd "$OUT" && cat SHA256SUMS) >&2
}

case "${1:-build}" in
  build) cmd_build ;;
  deps)
    if [ "${2:-}" = --test ]; then host_deps "${HOST_TOOLS[@]}" "${TEST_TOOLS[@]}"; else host_deps "${HOST_TOOLS[@]}"; fi ;;
  clean) safe_rm "$OUT" ;;
  *) echo "usage: $0 [build|deps [--test]|clean]" >&2; exit 2 ;;
esac
