# Shared launcher settings for the training scripts (sourced, not run).
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
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
TORCHRUN=${TORCHRUN:-torchrun}
SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DISTRIBUTED_ARGS=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
                  --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE")
BACKEND_ARGS=()
if [ -n "${DEEPSPEED:-}" ]; then
  BACKEND_ARGS+=(--deepspeed "$DEEPSPEED")
fi
if [ -n "${FSDP:-}" ]; then
  BACKEND_ARGS+=(--fsdp "$FSDP" --fsdp_config "${FSDP_CONFIG:-$SCRIPTS_DIR/fsdp.json}")
fi
