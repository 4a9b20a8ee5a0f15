"""``python -m persvid_jax.data --name tiny --data_dir DIR``: builds persvid_synthetic."""

from persvid_jax.data import synthetic_tfds

if __name__ == "__main__":
  synthetic_tfds.main()
