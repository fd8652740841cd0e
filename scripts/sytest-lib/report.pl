#!/usr/bin/env perl
# Reads a SyTest run (TAP on stdout, progress on stderr) for scripts/sytest and writes
# summary.txt, failing.txt, skipped.txt and passed.txt; compares the passes with the pass list.
# Names are handled as the bytes SyTest printed (UTF-8), never decoded.
# Exits 1 when a listed test did not pass, 2 when the run produced no usable result.

use strict;
use warnings;

use Getopt::Long;

my ( $tap_file, $log_file, $list_file, $out, $update, $about );
GetOptions(
   'tap=s'     => \$tap_file,
   'log=s'     => \$log_file,
   'list=s'    => \$list_file,
   'out=s'     => \$out,
   'seconds=i' => \( my $seconds = 0 ),
   'full=i'    => \( my $full = 1 ),
   'update'    => \$update,
   'about=s'   => \$about,
) and $tap_file and $log_file and $list_file and $out or die "usage: report.pl --tap F --log F --list F --out DIR\n";

sub slurp_lines
{
   my ( $path ) = @_;
   open my $fh, "<:raw", $path or return ();
   chomp( my @lines = <$fh> );
   return @lines;
}

sub write_file
{
   my ( $path, $text ) = @_;
   open my $fh, ">:raw", $path or die "Cannot write $path - $!\n";
   print $fh $text;
}

# Test number => file, from the progress log: "tests/…/x.pl:" then "    Test N name... RESULT".
my %file_of;
my $file = "?";
for ( slurp_lines( $log_file ) ) {
   if( m/^(tests\/\S+\.pl):$/ ) { $file = $1 }
   elsif( m/^\s+Test (\d+) / ) { $file_of{$1} = $file }
}

# "HTTP Request failed ( 404 Not Found https://host/path?query ) from GET https://…" is long and
# carries access tokens: keep the method, the path and the status.
sub shorten
{
   my ( $line ) = @_;
   $line =~ s{^(fixture failed - )?HTTP Request failed \( (\d{3}) (.*?) https?://[^/\s]+(/[^?\s]*)\S* \) from (\w+) .*$}
             {( $1 // "" ) . "$5 $4 answered $2 $3"}e;
   $line =~ s/access_token=[^&\s]+/access_token=…/g;
   return $line;
}

# Results from the TAP, in run order: { num, name, file, result (pass|fail|skip), reason }.
my @results;
my $planned;
my @failed_steps;
my $last;
for ( slurp_lines( $tap_file ) ) {
   if( m/^1\.\.(\d+)$/ ) {
      $planned = $1;
   }
   elsif( m/^  not ok \d+ (.*)$/ ) {
      push @failed_steps, $1;
   }
   elsif( m/^(not )?ok (\d+) (.*)$/ ) {
      my ( $not, $num, $name ) = ( $1, $2, $3 );
      my ( $result, $reason ) = ( $not ? "fail" : "pass", undef );
      if( !$not and $name =~ s/ # skip (.*)$// ) {
         ( $result, $reason ) = ( "skip", $1 );
      }
      $name =~ s/ # TODO .*$//;
      $name =~ s/^\(expected fail\) //;
      $name =~ s/ \(\d+ subtests\)$// unless $not;
      $reason = join "; ", map { "step failed: $_" } @failed_steps if $not and @failed_steps;
      @failed_steps = ();
      push @results, $last = {
         num => $num, name => $name, file => $file_of{$num} // "?", result => $result, reason => $reason,
      };
   }
   elsif( $last and $last->{result} eq "fail" and m/^# (.*)$/
          and $1 !~ m/^(Started|Ended): / and $1 !~ m/^[\d.]+: Registered new user / ) {
      # The first line of the failure explains it best; step failures (multi tests) come first.
      my $line = shorten( $1 );
      if( !defined $last->{reason} ) { $last->{reason} = $line }
      elsif( !defined $last->{detail} ) { $last->{detail} = $line }
   }
   elsif( !m/^#/ ) {
      undef $last;
   }
}

if( !@results ) {
   print STDERR "sytest: the run produced no results; see $log_file\n";
   exit 2;
}

my %count = ( pass => 0, fail => 0, skip => 0 );
$count{ $_->{result} }++ for @results;

# A few names occur twice in SyTest: a name passes when a test of that name passed and none
# failed (the other may be skipped, as tests needing a second homeserver are).
my ( %ran, %passed, %failed );
for ( @results ) {
   $ran{ $_->{name} }++;
   $passed{ $_->{name} }++ if $_->{result} eq "pass";
   $failed{ $_->{name} }++ if $_->{result} eq "fail";
}
delete @passed{ keys %failed };

my @list_lines = slurp_lines( $list_file );
my @listed = grep { length and !m/^#/ } @list_lines;
my %listed = map { $_ => 1 } @listed;
# "# flaky: NAME" lines name tests that pass only sometimes: neither required nor reported.
my %flaky = map { m/^# flaky: (.*)$/ ? ( $1 => 1 ) : () } @list_lines;

my @regressions = grep { $ran{$_} and !$passed{$_} and !$flaky{$_} } @listed;
my @not_run = grep { !$ran{$_} } @listed;
my %seen;
my @new_passes = grep { $passed{$_} and !$listed{$_} and !$flaky{$_} and !$seen{$_}++ } map { $_->{name} } @results;

# Grouped by file, in run order.
sub by_file
{
   my ( $result ) = @_;
   my ( @files, %tests );
   for ( grep { $_->{result} eq $result } @results ) {
      push @files, $_->{file} unless $tests{ $_->{file} };
      push @{ $tests{ $_->{file} } }, $_;
   }
   my $text = "";
   for my $f ( @files ) {
      $text .= sprintf "%s (%d)\n", $f, scalar @{ $tests{$f} };
      for ( @{ $tests{$f} } ) {
         $text .= "  $_->{name}\n";
         $text .= "      $_->{reason}\n" if defined $_->{reason};
         $text .= "      $_->{detail}\n" if defined $_->{detail};
      }
      $text .= "\n";
   }
   return $text;
}

my $total = @results;
my $summary = sprintf "SyTest against Hearth%s: %d tests in %d s\npassed %d, failed %d, skipped %d\n",
   ( defined $about ? " ($about)" : "" ), $total, $seconds, @count{qw( pass fail skip )};
$summary .= "The run stopped early: SyTest printed no plan line (see sytest.log).\n" unless defined $planned;
$summary .= sprintf "Pass list: %d tests, %d did not pass%s\n", scalar @listed, scalar @regressions,
   ( $full ? "" : ", " . scalar( @not_run ) . " not in this run" );
$summary .= "\nListed in the pass list but did not pass (regressions):\n" . join( "", map { "  $_\n" } @regressions )
   if @regressions;
$summary .= "\nListed in the pass list but not run (renamed or removed in SyTest?):\n" . join( "", map { "  $_\n" } @not_run )
   if $full and @not_run;
$summary .= "\nPassed but not in the pass list (add them with scripts/sytest --update):\n"
   . join( "", map { "  $_\n" } @new_passes )
   if @new_passes and !$update;

write_file( "$out/summary.txt", $summary );
write_file( "$out/failing.txt", by_file( "fail" ) );
write_file( "$out/skipped.txt", by_file( "skip" ) );
write_file( "$out/passed.txt", join "", map { "$_->{name}\n" } grep { $_->{result} eq "pass" } @results );
print $summary;

if( $update ) {
   # Keep the header and the listed tests this run did not cover; replace the rest.
   my @header = grep { m/^#/ } @list_lines;
   @header = (
      "# SyTest tests Hearth passes, one name a line: scripts/sytest fails when one of them does not",
      "# pass. Regenerate with scripts/sytest --update after a full run. A line \"# flaky: NAME\" marks a",
      "# test that passes only sometimes: it is neither required nor added.",
   ) unless @header;
   my %keep = map { $_ => 1 } ( grep( { !$ran{$_} } @listed ), grep( { !$flaky{$_} } keys %passed ) );
   write_file( $list_file, join "", map { "$_\n" } @header, sort keys %keep );
   printf "Pass list rewritten: %d tests (%s)\n", scalar keys %keep, $list_file;
   exit 0;
}

exit( ( @regressions or ( $full and @not_run ) ) ? 1 : 0 );
