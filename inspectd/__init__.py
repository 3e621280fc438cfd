"""inspectd: single-pass defect score + CAM mask inspection (Augustauskas et al., IDAACS 2023)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
