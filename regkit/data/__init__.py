"""Datasets: NIfTI pair lists, the embedded synthetic dataset, and safe volume I/O."""
from regkit.data.io import Volume, atomic_write, load_volume, save_nifti
from regkit.data.pairs import EpochSampler, Pair, PairDataset, read_pairs_csv, write_pairs_csv
from regkit.data.module import PairData
from regkit.data.synthetic import SyntheticData, generate_synthetic, synthetic_labels
from regkit.data.datasets import IXIData, Learn2RegData

__all__ = ["Volume", "atomic_write", "load_volume", "save_nifti", "EpochSampler", "Pair",
           "PairDataset", "read_pairs_csv", "write_pairs_csv", "PairData", "SyntheticData",
           "generate_synthetic", "synthetic_labels", "IXIData", "Learn2RegData"]
