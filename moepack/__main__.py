from moepack.cli.app import main

main()
