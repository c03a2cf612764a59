from lorabench.data.imagefolder import ImageFolderDataModule, collate, load_image, scan_folder
from lorabench.data.toy import toy_datamodule, write_toy_dataset

__all__ = ["ImageFolderDataModule", "collate", "load_image", "scan_folder", "toy_datamodule", "write_toy_dataset"]
