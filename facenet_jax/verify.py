"""`python -m facenet_jax.verify DIR IMG_A IMG_B [--threshold T]`: are two face images the same
person, by a trained run? (facenet_jax.eval.verify)"""

if __name__ == "__main__":
    from facenet_jax import cli
    from facenet_jax.eval.verify import define_flags, main
    from facenet_jax.eval.verify import __doc__  # noqa: F401 (--help describes the command)

    define_flags()
    cli.run(main)
