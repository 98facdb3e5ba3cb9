"""Host-side networking: CNI attachment, netns/tap/tc wiring of a pod's network into its VM."""
