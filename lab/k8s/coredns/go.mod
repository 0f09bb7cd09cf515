// Pins CoreDNS, the lab cluster's DNS add-on (lab/k8s/build.sh).
module sluice.lab/coredns

go 1.24.0

require github.com/coredns/coredns v1.12.3
