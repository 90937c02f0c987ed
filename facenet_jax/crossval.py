"""`python -m facenet_jax.crossval --config C --pairs PAIRS --workdir D [--folds 1,3]`: the LFW
protocol as one command (facenet_jax.eval.crossval)."""

if __name__ == "__main__":
    from facenet_jax import cli
    from facenet_jax.eval.crossval import define_flags, main
    from facenet_jax.eval.crossval import __doc__  # noqa: F401 (--help describes the command)

    define_flags()
    cli.run(main)
