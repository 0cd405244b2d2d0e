"""Launching a phase's training: `accelerate launch -m training.train` as a process group we own
(a local launch), or a cluster job (training.scheduler). The caller (the phase task) picks one.

    config.py       the launch files (job.json, accelerate.yaml, deepspeed.json) and the launch command
    devices.py      the GPUs this machine has, and how training and evaluation share them
    local.py        a local launch: start the process group, stream its output, stop it, say how it ended
    files.py        the run's files as it runs: new progress events, newly complete checkpoints, how it ended
    checkpoints.py  checkpoint directories on disk: complete, incomplete, keep_last_n, pruning

No torch here: the orchestrating process imports these (training.train is what touches the model).
"""
