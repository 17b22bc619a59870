# Shared launcher settings for the training scripts (sourced, not run). The scripts launch
#   $TORCHRUN "${DISTRIBUTED_ARGS[@]}" -m exgra_med.train RECIPE.yaml [paths] "${BACKEND_ARGS[@]}" [user flags]
# with a recipe of $RECIPES_DIR (the one home of the hyperparameters); the user's flags override the recipe.
# Every value comes from the environment, so the same script runs on a laptop CPU, one GPU node or many:
#   NPROC_PER_NODE  processes per node (default: number of visible GPUs, or 1)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (defaults: single node)
#   DEEPSPEED       a DeepSpeed config (e.g. scripts/deepspeed/zero2.json); empty = plain DDP
#   FSDP            FSDP mode for the HF Trainer, e.g. "full_shard auto_wrap" (uses scripts/fsdp.json)
#   TORCHRUN        the torchrun executable (default: torchrun on PATH)
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC_PER_NODE:-0}" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
fi
#   Several nodes: run the same script on every node with the same NNODES, MASTER_ADDR (node 0's address, reachable
#   from all nodes) and MASTER_PORT, and NODE_RANK 0..NNODES-1. Only global rank 0 writes the outputs.
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if ! [[ "$NNODES" =~ ^[1-9][0-9]*$ && "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "$(basename "$0"): NODE_RANK must be 0..NNODES-1, got NODE_RANK=$NODE_RANK NNODES=$NNODES" >&2
  exit 2
fi
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  # The single-node default (127.0.0.1) would leave every node but 0 waiting for a rendezvous that never comes.
  echo "$(basename "$0"): NNODES=$NNODES needs MASTER_ADDR, the address of node 0 reachable from every node" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TORCHRUN=${TORCHRUN:-torchrun}
SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPES_DIR=$(cd "$SCRIPTS_DIR/../recipes" && pwd)

DISTRIBUTED_ARGS=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
                  --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE")
BACKEND_ARGS=()
if [ -n "${DEEPSPEED:-}" ]; then
  BACKEND_ARGS+=(--deepspeed "$DEEPSPEED")
fi
if [ -n "${FSDP:-}" ]; then
  BACKEND_ARGS+=(--fsdp "$FSDP" --fsdp_config "${FSDP_CONFIG:-$SCRIPTS_DIR/fsdp.json}")
fi
