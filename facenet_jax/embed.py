"""`python -m facenet_jax.embed --workdir DIR --data_root FOLDER --output FILE.npz`: a folder's
embeddings by a trained run (facenet_jax.eval.embed)."""

if __name__ == "__main__":
    from facenet_jax import cli
    from facenet_jax.eval.embed import define_flags, main
    from facenet_jax.eval.embed import __doc__  # noqa: F401 (--help describes the command)

    define_flags()
    cli.run(main)
