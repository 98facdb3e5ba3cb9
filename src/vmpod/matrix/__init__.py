"""`vmpod matrix`: build, load and test one kernel module on many kernels at once."""
