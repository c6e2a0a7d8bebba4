#!/usr/bin/env bash
# Install a dropfleet client (SuperNode + SuperExec) on an arm64 or x86_64 board
# with Python 3.11: a venv with the pinned board wheels only, the node config,
# a node key, the SuperExec's secret, and the systemd units (for this prefix and etc).
# Run from a checkout of the repository:
#     sudo deploy/edge/install.sh                 # install into /opt/dropfleet
#     deploy/edge/install.sh --prefix /tmp/x --no-systemd   # try it unprivileged
#     sudo deploy/edge/install.sh --runtime torch # also torch (boards with RAM to spare)
set -euo pipefail

PREFIX=/opt/dropfleet
ETC=/etc/dropfleet
SYSTEMD=1
RUNTIME=lean
PYTHON=${PYTHON:-python3.11}
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --etc) ETC=$2; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
REPO=$(cd "$(dirname "$0")/../.." && pwd)
case "$RUNTIME" in
  lean|torch) ;;
  *) echo "--runtime is lean (NumPy only, the default) or torch" >&2; exit 2 ;;
esac

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "Python 3.11 is required" >&2; exit 1; }
echo "venv in $PREFIX/venv"
"$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
# The board's pinned wheels: Flower, NumPy, protobuf and what they require (no torch, no
# datasets: the lean runtime trains on NumPy alone). --runtime torch adds torch==2.13.0, a
# CPU build on aarch64 (PyPI) and from PyTorch's CPU index on x86_64. Offline or behind a
# proxy, say where the CPU wheel is:
#     TORCH_SOURCE="--find-links /path/to/wheels" deploy/edge/install.sh --runtime torch
if [ "$RUNTIME" = torch ]; then
  TORCH_SOURCE=${TORCH_SOURCE-"--extra-index-url https://download.pytorch.org/whl/cpu"}
  # shellcheck disable=SC2086 # TORCH_SOURCE is pip arguments
  "$PREFIX/venv/bin/pip" install -q $TORCH_SOURCE --require-hashes \
    -r "$REPO/requirements-client.lock" -r "$REPO/requirements-torch.lock"
else
  "$PREFIX/venv/bin/pip" install -q --require-hashes -r "$REPO/requirements-client.lock"
fi
"$PREFIX/venv/bin/pip" install -q --no-deps "$REPO"
"$PREFIX/venv/bin/python" -c "import dropfleet.client.app, dropfleet.client.$([ "$RUNTIME" = torch ] && echo local || echo lean)"

# The torch runtime's demo data set: each board trains its partition of Fashion-MNIST. A lean
# board trains on its own data only (node.env's data-dir).
if [ "$RUNTIME" = torch ] && [ ! -e /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist as root)," \
      "or point DROPFLEET_DATA_DIR in node.env at this board's data" >&2
  fi
fi

# The units and node.env name /opt/dropfleet and /etc/dropfleet: installed for this prefix and etc.
for_here() { sed -e "s|/opt/dropfleet|$PREFIX|g" -e "s|/etc/dropfleet|$ETC|g" "$1"; }
mkdir -p "$ETC/keys"
if [ ! -f "$ETC/node.env" ]; then
  if [ "$RUNTIME" = torch ]; then  # torch: the demo's partition of Fashion-MNIST, no data-dir needed
    for_here "$REPO/deploy/edge/node.env" \
      | sed -e 's|^NODE_CONFIG=.*|NODE_CONFIG=profile="pi4-4g" runtime="torch" partition-id=0 num-partitions=10|' \
      > "$ETC/node.env"
  else
    for_here "$REPO/deploy/edge/node.env" > "$ETC/node.env"
  fi
fi
# Secrets are created private (umask 077), never chmod'ed afterwards.
if [ ! -f "$ETC/keys/node_key" ]; then
  (umask 077 && ssh-keygen -q -t ecdsa -b 384 -N "" -f "$ETC/keys/node_key" -C dropfleet-node)
fi
if [ ! -f "$ETC/keys/superexec-secret" ]; then
  (umask 077 && head -c 32 /dev/urandom | base64 > "$ETC/keys/superexec-secret")
fi
echo "node public key: $ETC/keys/node_key.pub: the operator registers it on the server with"
echo "  dropfleet fleet register-node node_key.pub"

if [ "$SYSTEMD" = 1 ]; then
  # Two users: the SuperNode's holds the node key; the SuperExec's (which runs ClientApps) cannot read it.
  id dropfleet >/dev/null 2>&1 || useradd --system --home /var/lib/dropfleet --shell /usr/sbin/nologin dropfleet
  id dropfleet-app >/dev/null 2>&1 \
    || useradd --system --home /var/lib/dropfleet-app --shell /usr/sbin/nologin dropfleet-app
  chown root:root "$ETC" && chmod 755 "$ETC"
  chown dropfleet:dropfleet-app "$ETC/keys" && chmod 750 "$ETC/keys"
  chown dropfleet:dropfleet "$ETC/keys/node_key" && chmod 600 "$ETC/keys/node_key"
  chown dropfleet:dropfleet-app "$ETC/keys/superexec-secret" && chmod 640 "$ETC/keys/superexec-secret"
  # The board's own data: read by its ClientApps (the SuperExec's user).
  install -d -o dropfleet-app -g dropfleet-app -m 750 /var/lib/dropfleet-app /var/lib/dropfleet-app/data
  for unit in dropfleet-supernode.service dropfleet-superexec.service; do
    for_here "$REPO/deploy/edge/$unit" > "/etc/systemd/system/$unit" && chmod 644 "/etc/systemd/system/$unit"
  done
  systemctl daemon-reload
  [ "$RUNTIME" = lean ] && echo "put this board's train.npz (or IDX files) in /var/lib/dropfleet-app/data"
  echo "edit $ETC/node.env; copy the fleet's ca.crt and app-signer.pub to $ETC/, then:"
  echo "  systemctl enable --now dropfleet-supernode dropfleet-superexec"
fi
echo "installed"
