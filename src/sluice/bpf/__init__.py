"""libbpf binding, BTF reader and BPF object handling."""
