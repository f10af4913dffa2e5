"""The image data sets: MNIST and its kin, CIFAR-10, CelebA and folders of pictures, as whole tensors."""
