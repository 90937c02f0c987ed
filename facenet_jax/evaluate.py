"""`python -m facenet_jax.evaluate ...`: the evaluation command (facenet_jax.eval.cli, where its
modes and flags are described)."""

if __name__ == "__main__":
    from facenet_jax import cli
    from facenet_jax.eval.cli import define_flags, main, split_run_config_flags
    from facenet_jax.eval.cli import __doc__  # noqa: F401 (--help describes the command)

    define_flags()
    cli.run(main, rewrite_argv=split_run_config_flags)
