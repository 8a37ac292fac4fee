"""The control plane: the gRPC protocol between workers, node launchers and the master."""
