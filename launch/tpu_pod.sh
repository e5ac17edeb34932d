#!/usr/bin/env bash
# Train jaxrec on a Cloud TPU VM pod slice (or several slices: Multislice).
#
#   TPU_NAME=my-tpu ZONE=us-central2-b CREATE=1 ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=gs://my-bucket/runs/ml1m bash launch/tpu_pod.sh \
#       --config=experiments/configs/ml1m.py --config.mesh=data:-1,tensor:4
#
# Steps, from this machine with gcloud: (1) create the TPU if CREATE=1; (2) on
# every host of every slice: get the code (git clone REPO_URL, or copy this
# checkout's files), create a Python venv and `pip install -r requirements.txt`
# plus jax[tpu]; (3) on every host at once: `python -m experiments.train`, with
# the arguments of this script passed on. Each host is one JAX process; JAX
# detects the pod slice's hosts itself (the script passes --distributed=on, see
# experiments/runtime.py), so no coordinator flags are needed.
#
# Multislice (NUM_SLICES > 1): the slices are requested as one queued resource
# (`gcloud compute tpus queued-resources create --node-count`), named
# TPU_NAME-0 .. TPU_NAME-<N-1>; JAX connects them over the data-centre network
# (DCN). Put the mesh's outermost, slowest axis across slices: `replica` must
# equal the number of slices, e.g. NUM_SLICES=2 with --config.mesh=replica:2,data:-1
# (gradient compression with --config.compression.hierarchical=True then
# compresses only what crosses slices).
#
# Variables:
#   TPU_NAME          TPU VM name; with NUM_SLICES>1 the queued resource and slice
#                     name prefix (required)
#   ZONE              zone (required), e.g. us-central2-b
#   PROJECT           GCP project (default: gcloud's configured project)
#   CREATE=1          create the TPU (queued resource when NUM_SLICES>1) first
#   ACCELERATOR_TYPE  per slice, used with CREATE=1 (default v4-32)
#   RUNTIME_VERSION   TPU VM image, used with CREATE=1 (default tpu-ubuntu2204-base)
#   SPOT=1            with CREATE=1: spot (preemptible) capacity; a preempted run
#                     resumes from its last checkpoint when this script runs again
#   NUM_SLICES        slices (default 1); >1 = Multislice via queued resources
#   REPO_URL          git URL to clone on the hosts (default: copy this checkout's
#                     tracked and untracked-but-not-ignored files with scp)
#   REPO_REF          branch, tag or commit to check out after cloning (optional)
#   REMOTE_DIR        checkout directory on the hosts, relative to $HOME (default jaxrec)
#   PYTHON_VERSION    Python of the hosts' venv, installed by uv (default 3.11;
#                     jax 0.10 needs >= 3.11, newer than some TPU images' python3)
#   SETUP=0           skip copying the code and installing (re-run training only)
#   CONFIG            config file (default experiments/configs/quickstart.py)
#   WORKDIR           run folder every host must see (required): gs://BUCKET/PATH is
#                     mounted with gcsfuse at /tmp/gcs/BUCKET on every host (the
#                     loop writes through the file system); any other value is a path
#                     on the hosts — fine on a single host, else it must be shared
#                     (e.g. an NFS / Filestore mount), as checkpoints are written by
#                     all hosts
#   NODE_NAMES        space-separated TPU VM names to run on (default: TPU_NAME, or
#                     TPU_NAME-0 .. TPU_NAME-<NUM_SLICES-1>)
#   DRY_RUN=1         only print the gcloud commands
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${WORKDIR:?set WORKDIR (gs://BUCKET/PATH or a path every host sees)}"
PROJECT="${PROJECT:-}"
CREATE="${CREATE:-0}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
NUM_SLICES="${NUM_SLICES:-1}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
REMOTE_DIR="${REMOTE_DIR:-jaxrec}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
SETUP="${SETUP:-1}"
CONFIG="${CONFIG:-experiments/configs/quickstart.py}"
DRY_RUN="${DRY_RUN:-0}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

gcloud_flags=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then
  gcloud_flags+=(--project "$PROJECT")
fi
spot_flags=()
if [[ "$SPOT" == 1 ]]; then
  spot_flags=(--spot)
fi

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

if [[ -n "${NODE_NAMES:-}" ]]; then
  read -r -a nodes <<<"$NODE_NAMES"
elif ((NUM_SLICES > 1)); then
  nodes=()
  for ((s = 0; s < NUM_SLICES; s++)); do
    nodes+=("$TPU_NAME-$s")
  done
else
  nodes=("$TPU_NAME")
fi

# ---------------------------------------------------------------- 1. create
if [[ "$CREATE" == 1 ]]; then
  if ((NUM_SLICES > 1)); then
    run gcloud compute tpus queued-resources create "$TPU_NAME" "${gcloud_flags[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" \
      --node-count "$NUM_SLICES" --node-prefix "$TPU_NAME" ${spot_flags[@]+"${spot_flags[@]}"}
    if [[ "$DRY_RUN" != 1 ]]; then
      echo "waiting for queued resource $TPU_NAME to become ACTIVE ..." >&2
      while :; do
        state="$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${gcloud_flags[@]}" \
          --format='value(state.state)')"
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED) echo "queued resource $TPU_NAME is $state" >&2; exit 1 ;;
          *) echo "  state: ${state:-unknown}" >&2; sleep 30 ;;
        esac
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_flags[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" \
      ${spot_flags[@]+"${spot_flags[@]}"}
  fi
fi

# Runs a command on every host of every node (slice) at once; fails if any fails.
on_all_hosts() {
  local command="$1" node pids=() status=0 pid
  for node in "${nodes[@]}"; do
    if [[ "$DRY_RUN" == 1 ]]; then
      run gcloud compute tpus tpu-vm ssh "$node" "${gcloud_flags[@]}" --worker=all \
        --command "$command"
      continue
    fi
    gcloud compute tpus tpu-vm ssh "$node" "${gcloud_flags[@]}" --worker=all \
      --command "$command" &
    pids+=("$!")
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    wait "$pid" || status=$?
  done
  return "$status"
}

q() { printf '%q' "$1"; }

# ---------------------------------------------------------------- 2. setup
if [[ "$SETUP" == 1 ]]; then
  if [[ -n "$REPO_URL" ]]; then
    get_code="if [ -d $(q "$REMOTE_DIR")/.git ]; then git -C $(q "$REMOTE_DIR") fetch -q --all --tags \
&& git -C $(q "$REMOTE_DIR") pull -q --ff-only || true; else git clone -q $(q "$REPO_URL") $(q "$REMOTE_DIR"); fi"
    if [[ -n "$REPO_REF" ]]; then
      get_code+=" && git -C $(q "$REMOTE_DIR") checkout -q $(q "$REPO_REF")"
    fi
  else
    tarball="$(mktemp -t jaxrec-XXXXXX).tar.gz"
    trap 'rm -f "$tarball"' EXIT
    git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -
    for node in "${nodes[@]}"; do
      run gcloud compute tpus tpu-vm scp "$tarball" "$node:jaxrec-src.tar.gz" \
        "${gcloud_flags[@]}" --worker=all
    done
    get_code="mkdir -p $(q "$REMOTE_DIR") && tar -xzf jaxrec-src.tar.gz -C $(q "$REMOTE_DIR")"
  fi
  # uv (official installer, into ~/.local/bin) brings its own Python if the image's is older.
  install="export PATH=\$HOME/.local/bin:\$PATH \
&& { command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh -s -- -q; } \
&& cd $(q "$REMOTE_DIR") && { [ -x .venv/bin/python ] || uv venv -q --python $(q "$PYTHON_VERSION") .venv; } \
&& jax_version=\$(sed -n 's/^jax==//p' requirements.txt) \
&& uv pip install -q -p .venv/bin/python -r requirements.txt \"jax[tpu]==\$jax_version\""
  mount=""
  if [[ "$WORKDIR" == gs://* ]]; then
    # The official gcsfuse apt repository (https://cloud.google.com/storage/docs/gcsfuse-install).
    mount=" && if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null \
&& curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null \
&& sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi"
  fi
  on_all_hosts "set -e; $get_code && $install$mount"
fi

# ---------------------------------------------------------------- 3. train
workdir="$WORKDIR"
prepare=""
if [[ "$WORKDIR" == gs://* ]]; then
  path="${WORKDIR#gs://}"
  bucket="${path%%/*}"
  rest=""
  if [[ "$path" == */* ]]; then
    rest="${path#*/}"
  fi
  mountpoint_dir="/tmp/gcs/$bucket"
  workdir="$mountpoint_dir${rest:+/$rest}"
  prepare="mkdir -p $(q "$mountpoint_dir") && { mountpoint -q $(q "$mountpoint_dir") \
|| gcsfuse --implicit-dirs $(q "$bucket") $(q "$mountpoint_dir"); } && "
fi
args=""
for a in "$@"; do
  args+=" $(q "$a")"
done
# --distributed=on: jax.distributed.initialize() finds the slice's hosts itself (GCE TPU
# VMs publish them in the metadata server, not in environment variables).
on_all_hosts "set -e; ${prepare}cd $(q "$REMOTE_DIR") && .venv/bin/python -m experiments.train \
--distributed=on --config=$(q "$CONFIG") --workdir=$(q "$workdir")$args"
