"""The life of a job: `python run.py` composes the config and calls `vitsweep.run.modes.run`.

    modes.py           what each mode does (train, eval, visualize, pretrain), top to bottom
    build.py           the one build of every mode: task, model and data from the config (and `load`)
    job.py             the job's record, resume, the failure policy, signals
    ranks.py           one job, several processes: rank 0 leads, the others follow
    trained_config.py  what a restoring job takes from the checkpoint's config
    output_dir.py, sweep_report.py   Hydra callbacks: the job dir, the table of a sweep
"""
