# Sourced by the ia3-dist sbatch templates (run from the repo root: cd "$IA3_DIST_HOME" first); `ia3-dist slurm`
# inlines it into the files it writes, so those need no checkout.
# Sets CONFIG, OVERRIDES, OUTPUT_DIR, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, LOG_DIR; installs the preemption
# trap; ia3_run runs the training step in the background (a bash trap only fires between commands, so the work
# runs as `srun ... & wait`), and requeues the job when the run stopped on a signal after checkpointing or the hang
# watchdog ended it. ia3_eval is the evaluation job's (eval.sbatch) whole body.

ia3_log() { echo "[ia3-dist $(date +%H:%M:%S)] $*"; }

ia3_setup() {
  if [ $# -lt 1 ]; then echo "usage: sbatch $0 CONFIG.yaml [key.sub=value ...]" >&2; exit 2; fi
  CONFIG=$1; shift
  OVERRIDES=("$@")
  # The traps first: a warning while the config is read (resolve loads Python) would otherwise kill the batch
  # shell (USR1's default), with no requeue. Before the run dir is known it is "before training started".
  OUTPUT_DIR=""
  trap 'ia3_forward USR1' USR1
  trap 'ia3_forward TERM' TERM
  PYTHON=${PYTHON:-python}
  export PYTHON   # the per-node launcher commands (bash -c) run "$PYTHON -m ..." too
  # output.dir as the run will see it (config + overrides), for the pid file and the preemption marker.
  OUTPUT_DIR=$("$PYTHON" -m ia3_dist resolve --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --key output.dir) || exit 2
  NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
  NPROC_PER_NODE=${NPROC_PER_NODE##*:}          # "a100:4" -> 4
  # The first node's address as Slurm reaches it (NodeAddr): a node's name need not resolve to it (NodeName=n1
  # NodeHostname=... NodeAddr=10.0.0.7), and every node reaches it, slurmd to slurmd. Its name where scontrol cannot
  # say (slurmctld busy).
  local first addr=""
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  # (Never `scontrol show node` without a name: it lists every node of the cluster.)
  [ -z "$first" ] ||
    addr=$(scontrol show node "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
  addr=${addr%%,*}
  MASTER_ADDR=${addr:-$first}
  # From the job id, not an inherited MASTER_PORT (sbatch exports the submitting shell's: every job from it would
  # share one port); below Linux's ephemeral range (32768+), where a port may be taken by any outgoing connection.
  # IA3_DIST_MASTER_PORT picks one by hand.
  MASTER_PORT=${IA3_DIST_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
  LOG_DIR=${LOG_DIR:-logs}
  mkdir -p "$LOG_DIR"
  export MASTER_ADDR MASTER_PORT
  # Slurm 22.05-23.02's srun does not read SLURM_CPUS_PER_TASK (sbatch --cpus-per-task), only this: without it a
  # job step gets one CPU per task, and a launcher's ranks share one core where cores are enforced.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi
  # Cluster-specific NCCL settings (uncomment what your fabric needs):
  # export NCCL_DEBUG=WARN
  # export NCCL_SOCKET_IFNAME=ib0            # or eth0 / hsn0: the interface between nodes
  # export NCCL_IB_HCA=mlx5                   # InfiniBand HCAs to use
  # export NCCL_NET_GDR_LEVEL=PHB             # GPUDirect RDMA
  # export NCCL_ASYNC_ERROR_HANDLING=1        # fail fast instead of hanging on a dead peer
  ia3_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NNODES node(s) x" \
          "$NPROC_PER_NODE rank(s), master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"
}

# The deepspeed launcher's device arguments (DS_DEVICES) for a one-node job: the GPUs Slurm gave it. Given
# --num_accelerators N the launcher drops CUDA_VISIBLE_DEVICES and runs on devices 0..N-1, which on a node that does
# not constrain devices (no ConstrainDevices=yes) may be another job's; --include names the job's own. Only where
# Slurm gave the job GPUs: a CPU job may inherit the variable from the shell it was submitted from.
ia3_ds_devices() {
  if [ -n "${SLURM_JOB_GPUS:-}${SLURM_GPUS_ON_NODE:-}" ] &&
     [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    local -a visible
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    if [ "${#visible[@]}" -lt "$NPROC_PER_NODE" ]; then
      echo "ia3-dist: NPROC_PER_NODE=$NPROC_PER_NODE ranks, but the job sees ${#visible[@]} GPU(s)" \
           "(CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES): ask for as many GPUs (--gpus-per-node) or run fewer ranks" >&2
      exit 2
    fi
    DS_DEVICES=(--include "localhost:$(IFS=,; echo "${visible[*]:0:$NPROC_PER_NODE}")")
  elif [ -n "${SLURM_JOB_GPUS:-}${SLURM_GPUS_ON_NODE:-}" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # GPUs named by UUID or MIG instance: --include takes indices, and --num_accelerators would drop the variable
    # and run on devices 0..N-1 (another job's, or the whole GPU instead of the slice).
    echo "ia3-dist: the job's GPUs are named CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES here, which the deepspeed" \
         "launcher cannot keep; render the job with ia3-dist slurm --launcher torchrun (or srun), which keeps them" >&2
    exit 2
  else
    DS_DEVICES=(--num_accelerators "$NPROC_PER_NODE")   # CPU ranks
  fi
}

# The pid in rank0.pid when it is a live ia3-dist process on this host; nothing for a pid file left by a run that
# was killed (SIGKILL, OOM, the hang watchdog), whose pid may since belong to any other process, nor for one that
# another host wrote (its second line names the host; a requeued job may start on other nodes).
ia3_rank0_pid() {
  local pid host stamp now stat fields
  [ -n "$OUTPUT_DIR" ] || return 0  # not known yet (a signal while ia3_setup reads the config)
  { IFS= read -r pid; IFS= read -r host; IFS= read -r stamp; } < <(head -c 512 "$OUTPUT_DIR/rank0.pid" 2>/dev/null) \
    || true
  case "$pid" in ''|*[!0-9]*) return 0 ;; esac
  [ -z "$host" ] || [ "$host" = "$(hostname)" ] || return 0
  if [ -n "$stamp" ]; then
    # Boot id and start time (field 22 of /proc/PID/stat): the process the file named, not one that took its pid
    # since (a job's pids repeat from run to run, an ia3-dist rank's included).
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
    read -r -a fields <<< "${stat##*) }"
    now="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null) ${fields[19]:-}"
    [ "$now" = "$stamp" ] || return 0
  fi
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qE 'ia3_dist|ia3-dist|launch\.py' && echo "$pid"
  return 0
}

# The host rank0.pid names when it is another one and this start's rank 0 wrote the file (newer than the start
# stamp): rank 0 runs on another node of the job (a batch host that is not the step's first node, a distribution
# that places task 0 elsewhere). Nothing otherwise.
ia3_rank0_elsewhere() {
  local pid host
  [ -n "${RUN_STAMP:-}" ] && [ "$OUTPUT_DIR/rank0.pid" -nt "$RUN_STAMP" ] || return 0
  { IFS= read -r pid; IFS= read -r host; } < <(head -c 512 "$OUTPUT_DIR/rank0.pid" 2>/dev/null) || true
  case "$pid" in ''|*[!0-9]*) return 0 ;; esac
  if [ -n "$host" ] && [ "$host" != "$(hostname)" ]; then echo "$host"; fi
  return 0
}

# Forward the preemption warning to global rank 0 (on this node, the job's first, or through srun on the node that
# runs it); the stop flag rides on the per-step all-reduce, so every rank stops at the same step boundary and
# checkpoints.
ia3_forward() {
  local pid host
  SIGNALLED=1  # what a preempted.json without exit 75 is trusted on (a launcher passes 1 on for torchrun, srun)
  LAST_SIGNAL=$1
  pid=$(ia3_rank0_pid)
  host=$(ia3_rank0_elsewhere)
  if [ -n "$pid" ]; then
    ia3_log "caught SIG$1: asking the run (rank 0, pid $pid) to checkpoint and stop"
    kill -USR1 "$pid" 2>/dev/null || true
  elif [ -n "$host" ]; then
    # One task per node checks the pid file against its own host and process table, as ia3_rank0_pid does here:
    # Slurm's node names need not be the hosts' names, and only the node running that process signals it. In the
    # background: the trap returns at once, and the wait for the run goes on.
    # (srun --overlap: Slurm 20.11+; it starts at once beside the training step, measured on Slurm 22.05.)
    ia3_log "caught SIG$1: rank 0 runs on $host; asking it through srun to checkpoint and stop"
    { timeout 120 srun --overlap --jobid="$SLURM_JOB_ID" --nodes="${SLURM_NNODES:-1}" --ntasks="${SLURM_NNODES:-1}" \
        --ntasks-per-node=1 --export=ALL bash -c "$(declare -f ia3_rank0_pid); OUTPUT_DIR=$(printf %q "$OUTPUT_DIR"); \
pid=\$(ia3_rank0_pid); [ -z \"\$pid\" ] || kill -USR1 \"\$pid\"" > /dev/null ||
        ia3_log "srun could not reach rank 0 on $host (exit $?): the run goes on until the job's time limit, from" \
                "its last checkpoint"; } &
  elif [ -n "${RUN_STAMP:-}" ] && [ "$OUTPUT_DIR/run.yaml" -nt "$RUN_STAMP" ]; then
    # This start wrote run.yaml and rank 0 has since removed its pid file: training is over (the run is writing
    # its adapter or exiting). Requeueing now would start a finished run again.
    ia3_log "caught SIG$1 after training ended: letting the run finish"
  else
    ia3_log "caught SIG$1 before training started: requeueing"
    PREEMPT_EARLY=1
    [ -n "${WORK_PID:-}" ] && kill -TERM "$WORK_PID" 2>/dev/null
  fi
}

# How to start this job again by hand: an array task alone (sbatch again would queue every task of its sweep).
ia3_resubmit_hint() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    echo "submit this task again (sbatch --array=${SLURM_ARRAY_TASK_ID:-N} on the sweep's file, or ia3-dist sweep" \
         "--force, which leaves finished tasks out)"
  else
    echo "submit the job again"
  fi
}

ia3_requeue() {
  # A requeue Slurm refused (slurmctld busy, requeue not allowed) must not end the job as COMPLETED: an afterok
  # evaluation job would start on an unfinished run. EX_TEMPFAIL, as the run itself exits when preempted.
  # An array task by its array id and index: the task that starts last may run under the array's own job id,
  # which scontrol reads as the whole array (every task requeued, the finished ones run again).
  local target=$SLURM_JOB_ID
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    target="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  fi
  if scontrol requeue "$target"; then
    exit 0
  fi
  ia3_log "scontrol requeue $target failed: ending with exit 75 (the run is not finished); $(ia3_resubmit_hint)" \
          "and it resumes with train.resume=auto"
  exit 75
}

# The step preempted.json names (0 where there is none: a stop before the first step, or before the launch).
ia3_preempted_step() {
  local step
  step=$(head -c 4096 "$OUTPUT_DIR/preempted.json" 2>/dev/null | sed -n 's/.*"step": *\([0-9][0-9]*\).*/\1/p' | head -n 1)
  echo "${step:-0}"
}

# Whether this preemption stopped at another step than the last requeues of this job did (a counter in LOG_DIR):
# false once MAX_STALLED_REQUEUES (default 3) requeues in a row stopped at the same step. What it guards against is
# a start that cannot reach a checkpoint before its time limit's warning (USR1): a stop on TERM (the scheduler
# preempting or cancelling the job) is no stall, however early, and starts the count afresh.
ia3_progress_since_last_requeue() {
  local file="$LOG_DIR/.ia3-dist-stalls-$SLURM_JOB_ID" step last=-1 n=0
  step=$(ia3_preempted_step)
  { read -r last n < "$file"; } 2>/dev/null || true
  case "$last$n" in *[!0-9-]*|'') last=-1; n=0 ;; esac
  if [ "$step" = "$last" ] && [ "${LAST_SIGNAL:-}" != TERM ]; then n=$((n + 1)); else n=0; fi
  echo "$step $n" > "$file"
  [ "$n" -lt "${MAX_STALLED_REQUEUES:-3}" ]
}

ia3_run() {
  if [ -n "${PREEMPT_EARLY:-}" ]; then  # the warning came before the launch: nothing to start, requeue now
    ia3_log "caught a signal before the launch: requeueing job $SLURM_JOB_ID"
    ia3_requeue
  fi
  rm -f "$OUTPUT_DIR/preempted.json" "$OUTPUT_DIR/hung.json"
  # A pid file of a run that did not end cleanly: until the new rank 0 writes its own, a signal must not reach
  # whatever process has that pid now. (One naming a live run stays: that run refuses a second one in its dir.)
  [ -n "$(ia3_rank0_pid)" ] || rm -f "$OUTPUT_DIR/rank0.pid"
  # Older than anything this start writes (the run's imports alone take seconds, so even 1 s mtimes order them):
  # run.yaml newer than it means this start's run got past its setup.
  # In LOG_DIR, on the shared filesystem as output.dir usually is: mtimes there come from one clock (the file
  # server's); a node-local stamp against a run.yaml on NFS compares two clocks, and a skew of more than the run's
  # setup time would swap "not started" and "training ended".
  RUN_STAMP=$(mktemp "${LOG_DIR:-${TMPDIR:-/tmp}}/.ia3-dist-start.XXXXXX" 2>/dev/null ||
              mktemp "${TMPDIR:-/tmp}/ia3-dist-start.XXXXXX")
  "$@" &
  WORK_PID=$!
  local rc
  # wait returns early for a trapped signal: keep waiting while the run lives; the last wait gives its exit code
  # (a trap that ran as the run ended leaves the interrupted wait's 128+n, and bash keeps the code to ask again).
  while kill -0 "$WORK_PID" 2>/dev/null; do
    wait "$WORK_PID"
  done
  wait "$WORK_PID"; rc=$?
  rm -f "$RUN_STAMP"
  # Exit 75 where this start checkpointed (preempted.json, removed above before it began: a signal that reached
  # only the job's steps, a USR1 from scancel without --batch, stops the run there too) or this shell caught a
  # signal. Not a bare 75: a rank TERMed by its launcher while the ranks met, because another failed its checks
  # (exit 2), exits 75 without a checkpoint, and srun reports the highest task code; requeued, it would loop.
  # preempted.json beside another code only where this shell forwarded a signal: a run that wrote it on a signal
  # of its own launcher (ending the ranks because one failed at every start) would be requeued for ever.
  if { [ "$rc" = 75 ] && { [ -n "${SIGNALLED:-}" ] || [ -e "$OUTPUT_DIR/preempted.json" ]; }; } ||
     { [ -e "$OUTPUT_DIR/preempted.json" ] && [ -n "${SIGNALLED:-}" ]; } || [ -n "${PREEMPT_EARLY:-}" ]; then
    if ! ia3_progress_since_last_requeue; then
      ia3_log "run stopped at step $(ia3_preempted_step) again, the same step as the last" \
              "${MAX_STALLED_REQUEUES:-3} requeue(s): not requeueing job $SLURM_JOB_ID (a start that cannot reach a" \
              "checkpoint before the scheduler's warning loops for ever); give the job more time or an earlier" \
              "warning (ia3-dist slurm --time), then $(ia3_resubmit_hint): it resumes with train.resume=auto"
      exit 75
    fi
    ia3_log "run stopped after a checkpoint (exit $rc): requeueing job $SLURM_JOB_ID; it resumes with train.resume=auto"
    ia3_requeue
  fi
  # Exit 76 (or hung.json: torchrun exits 1 and srun may report a killed peer's code): the hang watchdog ended the
  # run. Requeue like a preemption, at most MAX_HANG_REQUEUES times per job, so a hang that comes back every
  # time (a bug, not a bad node) does not loop for ever.
  if [ "$rc" = 76 ] || [ -e "$OUTPUT_DIR/hung.json" ]; then
    local count_file="$LOG_DIR/.ia3-dist-hangs-$SLURM_JOB_ID" n
    n=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 ))
    echo "$n" > "$count_file"
    if [ "$n" -le "${MAX_HANG_REQUEUES:-3}" ]; then
      ia3_log "hang watchdog ended the run (exit $rc; $(cat "$OUTPUT_DIR/hung.json" 2>/dev/null)): requeueing job" \
              "$SLURM_JOB_ID (hang $n of at most ${MAX_HANG_REQUEUES:-3}); it resumes with train.resume=auto"
      ia3_requeue
    fi
    ia3_log "hang watchdog ended the run $n times: not requeueing again (MAX_HANG_REQUEUES=${MAX_HANG_REQUEUES:-3})"
    exit 76
  fi
  if [ "$rc" = 75 ]; then
    ia3_log "run ended with exit 75 without a signal to this job: not requeueing; a rank stopped while the ranks" \
            "met because another failed first (srun reports the highest task exit code): the first error is in" \
            "the rank logs in $LOG_DIR"
    exit 75
  fi
  ia3_log "run finished with exit $rc"
  exit "$rc"
}

# The evaluation job: `ia3-dist eval` on the run's output.dir. Arguments: CONFIG [overrides ...] [-- eval options];
# the training job's config and overrides, so output.dir resolves (from the same start folder) as it did there.
# No trap and no requeue of its own: an evaluation keeps no state between starts, so a job Slurm requeues
# (preemption, node failure) simply evaluates again.
ia3_eval() {
  local run=() rc
  while [ $# -gt 0 ] && [ "$1" != -- ]; do run+=("$1"); shift; done
  [ $# -eq 0 ] || shift   # the --
  if [ ${#run[@]} -lt 1 ]; then
    echo "usage: sbatch $0 CONFIG.yaml [key.sub=value ...] [-- ia3-dist eval options]" >&2; exit 2
  fi
  PYTHON=${PYTHON:-python}
  OUTPUT_DIR=$("$PYTHON" -m ia3_dist resolve --config "${run[0]}" "${run[@]:1}" --key output.dir) || exit 2
  local n=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  n=${n##*:}   # "a100:4" -> 4
  ia3_log "eval job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, ${n:-1} rank(s):" \
          "ia3-dist eval $OUTPUT_DIR $*"
  if [ "${n:-1}" -gt 1 ] 2>/dev/null; then
    # One rank per GPU (per CPU rank on CPU nodes): ia3-dist eval splits each task's documents and the held-out
    # data over the ranks, and rank 0 writes the results.
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$n" -m ia3_dist eval "$OUTPUT_DIR" "$@"
  else
    "$PYTHON" -m ia3_dist eval "$OUTPUT_DIR" "$@"
  fi
  rc=$?
  ia3_log "eval finished with exit $rc"
  exit "$rc"
}
