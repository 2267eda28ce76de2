fn main() {
    std::process::exit(postflow::cli::main());
}
