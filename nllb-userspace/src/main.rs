fn main() { println!("{}", nllb::EBPF_OBJECT.len()); }
