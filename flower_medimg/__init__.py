"""flower-medimg: federated learning for medical imaging on Flower and MONAI."""

__version__ = "0.1.0"
