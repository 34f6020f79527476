"""Running zdist beyond one machine: cluster objects, and the Center file batch jobs find their Center by.

>>> from zdist.deploy import read_center_file
"""
from ..centerfile import CenterFile, read_center_file, write_center_file

__all__ = ["CenterFile", "read_center_file", "write_center_file"]
