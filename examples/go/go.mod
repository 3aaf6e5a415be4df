module aeordb

go 1.24
