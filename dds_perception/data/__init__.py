"""Data layer: KITTI and Caltech readers, image decoding, transforms, generated scenes."""
