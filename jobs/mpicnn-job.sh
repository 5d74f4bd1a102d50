# Shared by the job scripts in jobs/slurm and jobs/pbs (sourced, not run).
#
# mpicnn_env            the environment cluster runs need (file locking off, thread counts)
# mpicnn_slurm_launcher  set MPICNN_LAUNCH to srun or mpirun for this allocation ($LAUNCHER)
# mpicnn_run CMD...     run the MPI launcher in the background under the restart supervisor
#                       (python -m mpicnn.run: after a crash, relaunch with --resume auto up
#                       to $MAX_RESTARTS times; under srun leave out a node that failed
#                       twice), forward stop signals to it, wait, and leave the exit status
#                       in $MPICNN_RC
# mpicnn_requeue        SLURM: after a stop on the warning signal (exit 75, checkpoint
#                       written), requeue this job (arrays as JOBID_TASKID), at most
#                       $MAX_REQUEUES times; then exit with the run's status
#
# Knobs (environment): PYTHON, LAUNCHER, SRUN_MPI, MPIRUN, LAUNCH_FLAGS, MAX_REQUEUES,
# MAX_RESTARTS, RESTART_BACKOFF (described at the top of jobs/slurm/train.sbatch).

MPICNN_PREEMPTED=75          # mpicnn.resilience.preemption.PREEMPTED_EXIT
: "${PYTHON:=python3}"
: "${MAX_REQUEUES:=3}"
: "${MAX_RESTARTS:=3}"
: "${RESTART_BACKOFF:=10}"

mpicnn_log() { echo "mpicnn-job: $(date '+%F %T') $*"; }

mpicnn_env() {
    # Parallel filesystems (Lustre, GPFS) often lack the POSIX locks HDF5 asks for.
    export HDF5_USE_FILE_LOCKING=FALSE
    # One rank's math libraries use the cores given to that rank, no more.
    local cpus="${SLURM_CPUS_PER_TASK:-${MPICNN_CPUS_PER_RANK:-1}}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$cpus}"
    export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
    # srun does not inherit sbatch's --cpus-per-task since SLURM 22.05.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
    fi
    export PYTHONUNBUFFERED=1
}

mpicnn_slurm_launcher() {
    case "${LAUNCHER:-srun}" in
        srun)   MPICNN_LAUNCH=(srun --mpi="${SRUN_MPI:-pmi2}" --kill-on-bad-exit=1) ;;
        # MPICH's hydra and Open MPI find the nodes and ranks per node in the allocation.
        mpirun) MPICNN_LAUNCH=("${MPIRUN:-mpirun}" -n "$SLURM_NTASKS") ;;
        *)      echo "mpicnn: error: LAUNCHER=$LAUNCHER: use srun or mpirun" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2206  # LAUNCH_FLAGS is a list of words on purpose
    MPICNN_LAUNCH+=(${LAUNCH_FLAGS:-})
}

_mpicnn_forward() {
    local sig="$1"
    MPICNN_SIGNAL="${MPICNN_SIGNAL:-$sig}"
    mpicnn_log "got SIG$sig: asking the ranks to checkpoint and stop"
    if [ -n "${MPICNN_LAUNCHER_PID:-}" ]; then
        # srun, MPICH's mpiexec and Open MPI's mpirun all pass the signal to every rank.
        kill -s "$sig" "$MPICNN_LAUNCHER_PID" 2>/dev/null || true
    fi
}

mpicnn_run() {
    MPICNN_SIGNAL=""
    MPICNN_LAUNCHER_PID=""
    # A bash trap only runs when the foreground command returns, so the launcher runs in
    # the background and the script waits for it.
    trap '_mpicnn_forward USR1' USR1
    trap '_mpicnn_forward TERM' TERM
    trap '_mpicnn_forward INT' INT
    mpicnn_log "running: $*"
    local command=("$@")
    if [ "$MAX_RESTARTS" -gt 0 ]; then
        # The supervisor relaunches after a crash (not after bad input, exit 2, or a clean
        # stop, exit 75) and passes stop signals on to the launcher.
        mpicnn_log "after a crash: up to $MAX_RESTARTS restart(s) from the newest checkpoint" \
                   "(python -m mpicnn.run, first after ${RESTART_BACKOFF} s)"
        command=("$PYTHON" -m mpicnn.run --max-restarts "$MAX_RESTARTS"
                 --backoff "$RESTART_BACKOFF" -- "$@")
    fi
    "${command[@]}" &
    MPICNN_LAUNCHER_PID=$!
    while :; do
        wait "$MPICNN_LAUNCHER_PID"
        MPICNN_RC=$?
        # wait returns early (status > 128) when a trapped signal arrives
        kill -0 "$MPICNN_LAUNCHER_PID" 2>/dev/null || break
    done
    trap - USR1 TERM INT
    mpicnn_log "launcher exited with status $MPICNN_RC"
}

mpicnn_requeue() {
    if [ "$MPICNN_RC" -eq "$MPICNN_PREEMPTED" ] && [ -n "${SLURM_JOB_ID:-}" ] &&
            [ "$MPICNN_SIGNAL" != TERM ]; then
        # SIGTERM means SLURM is ending the job (scancel, time limit, preemption): it
        # requeues preempted jobs itself, and a cancelled job must stay cancelled.
        local id="$SLURM_JOB_ID" restarts="${SLURM_RESTART_COUNT:-0}"
        if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
            id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
        fi
        if [ "$restarts" -lt "$MAX_REQUEUES" ]; then
            mpicnn_log "checkpoint written; requeueing job $id (restart $((restarts + 1)) of" \
                       "at most $MAX_REQUEUES)"
            if scontrol requeue "$id"; then
                exit 0
            fi
            mpicnn_log "scontrol requeue $id failed; resubmit to continue from the checkpoint"
        else
            mpicnn_log "checkpoint written, but the job was requeued $restarts times already" \
                       "(MAX_REQUEUES=$MAX_REQUEUES): not requeueing again"
        fi
    fi
    exit "$MPICNN_RC"
}
