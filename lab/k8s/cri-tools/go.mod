// Pins crictl, the CRI client of the lab nodes (lab/k8s/build.sh).
module sluice.lab/cri-tools

go 1.24.1

require sigs.k8s.io/cri-tools v1.34.0
